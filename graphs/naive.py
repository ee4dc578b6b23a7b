"""The naive baseline: the same deployments and models with compute-awareness switched off.

No cache (nothing reused), one downstream call per request (nothing merged in the Router),
batch size 1 everywhere with no waiting window (the Embedder,
the search, and vLLM's scheduler: one sequence at a time, no prefix cache), FIFO instead of
priorities: each call runs on its own, the way a "storage first" memory layer calls its
models. It is a config of the same code, never a second implementation:

    make run CONFIG=configs/naive.yaml
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from graphs.app import bind_graph
from mneme.config import MnemeConfig, load_config

NO_BATCHING = {"max_batch_size": 1, "batch_wait_timeout_s": 0.0, "adaptive": False}

NAIVE_SWITCHES: dict[str, Any] = {
    "cache": {"enabled": False},
    "scheduler": {"policy": "fifo"},
    "router": {"coalesce": False},
    "embedder": {"batch": NO_BATCHING},
    "vector_search": {"batch": NO_BATCHING},
    "generator": {"max_num_seqs": 1, "enable_prefix_caching": False},
}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `base` with `over` applied, nested dicts merged key by key."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def naive_config(args: dict[str, Any] | None = None) -> MnemeConfig:
    """`args` (models, limits, ...) with every compute-aware switch forced off."""
    return load_config(merged(args or {}, NAIVE_SWITCHES))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """`import_path: graphs.naive:build_app` in a Serve YAML."""
    return bind_graph(naive_config(args))
