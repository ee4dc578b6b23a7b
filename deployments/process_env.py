"""The environment Ray Serve's processes need for Mneme, read as each starts: `make run` and
`graphs/serve_env.py` give it to them; the Router warns when it finds it missing. No Ray
import here: it is read before Ray starts."""

SERVE_ENV = {
    # the request-body limit, enforced by Serve's HTTP proxy itself (deployments/http_errors.py)
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.http_errors:proxy_middlewares",
    # Two of the settings RAY_SERVE_THROUGHPUT_OPTIMIZED makes; each saves a thread or loop
    # hop per downstream call. Its direct ingress is opt-in here (README "Direct ingress"), and
    # its gRPC calls between replicas are left out: in a worker-kill test they answered 2 adds
    # with a bare ValueError instead of a replica-unavailable error (README).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # handlers on the replica's own loop
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # a handle's request router on the caller's
}
