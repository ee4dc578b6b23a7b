"""What a replica knows about itself that the Router needs (for scheduling budgets)."""

from __future__ import annotations

from ray import serve

# The Router calls these deployments on every request; Serve's access log would write a line
# per call in each of them (and the Ray log monitor ship it): per HTTP request, 1-3 lines
# more than the Router's own. Off by default; a YAML turns it on per deployment with
# `logging_config: {enable_access_log: true}` (README "Operations").
DOWNSTREAM_LOGGING = {"enable_access_log": False}


def max_ongoing_requests() -> int | None:
    """This replica's `max_ongoing_requests` as deployed (YAML overrides included)."""
    try:
        return int(serve.get_replica_context()._deployment_config.max_ongoing_requests)
    except Exception:  # not inside a replica
        return None


def identity() -> dict[str, str | None]:
    """Which replica answered, and on which Ray node (stats; the cluster test reads them)."""
    try:
        import ray

        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "node": ray.get_runtime_context().get_node_id(),
        }
    except Exception:  # not inside a replica
        return {"replica": None, "node": None}
