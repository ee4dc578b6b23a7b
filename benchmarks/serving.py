"""Helpers for benchmarks that serve things: a local Ray Serve with the Mneme graph and a no-op
ingress beside it, on free loopback ports, torn down on exit."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from graphs import serve_env
from graphs.haproxy_orphans import stop_orphans


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_noop_app():
    """The cheapest FastAPI ingress Serve can run: the floor of any HTTP path here."""
    from fastapi import FastAPI
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(app)
    class NoOp:
        @app.post("/v1/embeddings")
        async def embeddings(self, body: dict) -> dict:
            return {"object": "list", "data": []}

    return NoOp.bind()


@contextlib.contextmanager
def served_graph(
    mneme_args: dict[str, Any], options: dict | None = None, direct_ingress: bool = False
) -> Iterator[str]:
    """Ray + Serve on a free port: Mneme (from YAML-style args) at `/`, no-op at `/noop`
    (`served_app` says what `direct_ingress` changes)."""
    import tempfile

    from graphs.app import bind_graph
    from graphs.naive import merged
    from mneme.config import load_config

    with tempfile.TemporaryDirectory(prefix="mneme-bench-") as data_dir:
        # a fresh memory log, unless the caller chose one
        args = merged({"vector_search": {"storage": {"data_dir": data_dir}}}, mneme_args)

        def build():
            return bind_graph(load_config(args), options)

        with served_app(build, direct_ingress=direct_ingress) as base_url:
            yield base_url


def ingress_url(app_name: str, proxy_url: str, timeout_s: float = 60.0) -> str:
    """Where `app_name` answers HTTP: its ingress replica's own port under direct ingress
    (the first replica's; nothing balances between replicas then), else the proxy's port
    (HAProxy's with the HAProxy ingress, which forwards to those replica ports)."""
    if (
        os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1"
        or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
    ):
        return proxy_url
    from ray.serve.context import _get_global_client

    proxy_port = int(proxy_url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout_s
    while True:
        groups = _get_global_client().get_serve_details().get("target_groups") or []
        ports = [
            target["port"]
            for group in groups
            if group["app_name"] == app_name and str(group["protocol"]).endswith("HTTP")
            for target in group["targets"]
        ]
        if ports and proxy_port not in ports:  # until a replica runs, they name the proxy
            return f"http://127.0.0.1:{ports[0]}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no direct-ingress port for {app_name!r}: {groups}")
        time.sleep(0.5)


@contextlib.contextmanager
def served_app(
    build: Callable[[], Any],
    num_cpus: int = 2,
    direct_ingress: bool = False,
    haproxy: bool = False,
) -> Iterator[str]:
    """Ray + Serve on a free port: the application `build()` returns at `/`, the no-op
    ingress at `/noop`; everything is shut down on exit. Yields Mneme's URL: the proxy's, or
    with `direct_ingress` the Router replica's own (`ingress_url` finds the no-op's); with
    `haproxy` (direct ingress behind Serve's HAProxy ingress) HAProxy's, on the proxy port."""
    env = {}
    if direct_ingress or haproxy:
        env = dict(serve_env.DIRECT_INGRESS_ENV)
    if haproxy:
        env |= serve_env.haproxy_settings(metrics_port=free_port(), stats_port=free_port())
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # read at import by the controller and replicas: before ray.init
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    port = free_port()
    with serve_env.for_ray_processes():  # as `make run` has it
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, namespace="mneme-bench"
        )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_noop_app(), name="noop", route_prefix="/noop")
        serve.run(build(), name="mneme", route_prefix="/")
        yield ingress_url("mneme", f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        if haproxy:
            stop_orphans()  # an HAProxy Ray left behind keeps the port (graphs/haproxy_orphans)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def summary_ms(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000.0
    return {
        "n": len(samples),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": statistics.fmean(ms),
    }
