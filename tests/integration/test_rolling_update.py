"""A `serve deploy` of a new user_config under load: applied in place, no request dropped."""

import threading
import time
import uuid

import pytest

from tests.integration.conftest import deploy

pytestmark = pytest.mark.slow


def replicas(http) -> dict[str, str]:
    stats = http.get("/v1/stats").json()
    return {name: stats[name]["replica"] for name in ("router", "embedder", "vector_search")}


def embedder_batch(http) -> int:
    return http.get("/v1/stats").json()["embedder"]["max_batch_size"]


def test_a_user_config_change_under_load_drops_nothing(served, http):
    failures: list[str] = []
    done: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with served.client(timeout=60) as client:
            while not stop.is_set():
                n = len(done)
                text = f"rolling update {worker} {n} {uuid.uuid4().hex[:6]}"
                calls = [
                    ("/v1/embeddings", {"input": text}),
                    (
                        "/v1/memories",
                        {"namespace": "rolling", "items": [{"id": f"r{worker}-{n}", "text": text}]},
                    ),
                    ("/v1/memories/search", {"namespace": "rolling", "query": text}),
                ]
                for path, body in calls:
                    try:
                        r = client.post(path, json=body)
                        (done if r.status_code == 200 else failures).append(
                            f"{path} {r.status_code}"
                        )
                    except Exception as exc:  # a dropped connection is a failure too
                        failures.append(f"{path} {type(exc).__name__}")

    before = replicas(http)
    workers = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2.0)
        in_flight_before = len(done)
        deploy({"Embedder": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01}})
        deadline = time.monotonic() + 60
        while embedder_batch(http) != 8:
            assert time.monotonic() < deadline, "the new user_config never reached the Embedder"
            time.sleep(0.2)
        time.sleep(2.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
        deploy({"Embedder": {"max_batch_size": 32, "batch_wait_timeout_s": 0.05}})
    assert not failures, failures[:10]
    assert len(done) > in_flight_before + 30  # requests kept flowing across the change
    assert replicas(http) == before, "a user_config change restarted replicas"
    stats = http.get("/v1/stats").json()["embedder"]
    assert (stats["max_batch_size"], stats["batch_wait_timeout_s"]) == (32, 0.05)
