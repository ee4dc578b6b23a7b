"""Upgrades: a `serve deploy` of a new user_config under load is applied in place with no
request dropped; a new Router meeting a VectorSearch replica of an earlier release still
answers its searches."""

import asyncio
import threading
import time
import uuid

import numpy as np
import pytest
from ray import serve

from deployments.downstreams import Downstreams
from deployments.vector_search import VectorSearch
from mneme.config import RouterConfig
from mneme.priority import RequestContext
from mneme.records import NewMemory, SearchQuery
from tests.configs import IN_MEMORY_SEARCH
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


@serve.deployment(ray_actor_options={"num_cpus": 0})
class VectorSearchBeforeSearchMany:
    """A VectorSearch replica as releases before 6 December had it: the real class's `upsert`
    and `search`, and no `search_many`. What a new Router meets while Serve replaces the
    application's deployments."""

    def __init__(self) -> None:
        self._search = VectorSearch.func_or_class(IN_MEMORY_SEARCH)

    async def upsert(self, namespace, items, vectors):
        return await self._search.upsert(namespace, items, vectors)

    async def search(self, query):
        return await self._search.search(query)


def test_merged_searches_that_meet_a_replica_without_search_many_are_sent_alone(served):
    """Real Serve answers the merged call with its missing-method error; each request's
    search is then sent as its own `search` call and gets its own hits."""
    handle = serve.run(
        VectorSearchBeforeSearchMany.bind(), name="vector-search-before", route_prefix=None
    )
    try:
        downstreams = Downstreams(None, handle, None, router=RouterConfig(coalesce=True))
        vectors = np.eye(4, dtype=np.float32)

        async def scenario() -> list[list[str]]:
            memories = [NewMemory(f"m{i}", f"memory {i}") for i in range(4)]
            await handle.upsert.remote("ns", memories, vectors)
            searches = [
                downstreams.search(SearchQuery("ns", vectors[i], 1, None), RequestContext())
                for i in range(4)
            ]
            return [[hit.id for hit in hits] for hits in await asyncio.gather(*searches)]

        assert asyncio.run(scenario()) == [["m0"], ["m1"], ["m2"], ["m3"]]
        assert downstreams.coalesced()["search"]["sent_alone"] == 4
    finally:
        serve.delete("vector-search-before")
