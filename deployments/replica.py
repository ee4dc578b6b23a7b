"""What a replica knows about itself that the Router needs (for scheduling budgets)."""

from __future__ import annotations

from ray import serve


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
