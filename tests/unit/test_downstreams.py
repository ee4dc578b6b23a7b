"""The Router's calls to its downstreams: what a scheduled generation tells vLLM."""

from __future__ import annotations

import asyncio

import numpy as np
from ray.exceptions import RayTaskError

from deployments.compute import ComputeGraph
from deployments.downstreams import DEPLOYMENT_NAMES, Downstreams, _translate
from deployments.http_errors import error_response
from deployments.vector_search import VectorSearch
from mneme.config import MnemeConfig, RouterConfig
from mneme.errors import InvalidRequest, MnemeError, Overloaded, Unavailable
from mneme.priority import Priority, RequestContext
from mneme.records import (
    Embeddings,
    Generation,
    GenerationDelta,
    GenerationRequest,
    NewMemory,
    SearchQuery,
)
from mneme.scheduler import PriorityScheduler
from tests.clock import Clock
from tests.configs import IN_MEMORY_SEARCH


class FakeGeneratorHandle:
    """Stands in for the Generator's Serve handle (no Ray here): records what it is sent."""

    def __init__(self) -> None:
        self.sent: list[GenerationRequest] = []
        self.generate = self

    def remote(self, request: GenerationRequest) -> asyncio.Future:
        self.sent.append(request)
        done = asyncio.get_running_loop().create_future()
        done.set_result(Generation("text", "length", 1, 1))
        return done


class FakeVectorSearchHandle:
    """Stands in for VectorSearch's Serve handle (no Ray here): records the writes sent."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.upsert = self

    def remote(self, namespace, items, vectors) -> asyncio.Future:
        self.sent += [item.id for item in items]
        done = asyncio.get_running_loop().create_future()
        done.set_result([item.id for item in items])
        return done


def test_a_write_whose_client_left_while_it_queued_is_never_sent():
    """Sent after its client gave up (and maybe wrote the same id again, acknowledged), the
    old write would land over the newer one: a write still queued is dropped with its
    request; one sent is waited for (tests/unit/test_cache_client.py)."""

    async def scenario():
        scheduler = PriorityScheduler("vector_search", 1)
        handle = FakeVectorSearchHandle()
        downstreams = Downstreams(None, handle, None, {"vector_search": scheduler})
        graph = ComputeGraph(MnemeConfig(), downstreams, cache=None)
        vectors = np.zeros((1, 4), dtype=np.float32)

        def add(memory_id: str) -> asyncio.Future:
            ctx = RequestContext()
            return asyncio.ensure_future(
                graph._write(
                    "ns",
                    lambda gone: downstreams.upsert(
                        "ns", [NewMemory(memory_id, "t")], vectors, ctx, gone
                    ),
                )
            )

        held = await scheduler.acquire(RequestContext())
        left, stayed = add("left"), add("stayed")
        await asyncio.sleep(0.01)
        assert handle.sent == []  # both queued for the one slot
        left.cancel()  # its client went away
        await asyncio.sleep(0.01)
        scheduler.release(held)
        assert await stayed == ["stayed"]
        await asyncio.sleep(0.01)
        assert handle.sent == ["stayed"]
        assert scheduler.stats()["in_flight"] == 0

    asyncio.run(scenario())


class FakeEmbedderHandle:
    """Stands in for the Embedder's Serve handle (no Ray here): 4-dimensional zeros."""

    def __init__(self) -> None:
        self.embed = self

    def remote(self, texts: list[str]) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        done.set_result(Embeddings(np.zeros((len(texts), 4), np.float32), [1] * len(texts)))
        return done


class FakeStreamingGeneratorHandle(FakeGeneratorHandle):
    """The Generator's handle with `stream=True`: one delta per request."""

    def __init__(self) -> None:
        super().__init__()
        self.generate_stream = self

    def options(self, stream: bool) -> FakeStreamingGeneratorHandle:
        return self

    def remote(self, request: GenerationRequest):
        self.sent.append(request)

        async def deltas():
            yield GenerationDelta("text", "length", 1, 1)

        return deltas()


def aged_background_call(key: str, call) -> None:
    """`call(downstreams, ctx)` made as background while `key`'s one slot is held, then
    dispatched once aging made it high (7 s: threshold 5 s and two 1 s boosts)."""

    async def scenario():
        clock = Clock(100.0)
        scheduler = PriorityScheduler(
            key, 1, starvation_threshold_s=5.0, boost_interval_s=1.0, timer=clock
        )
        held = await scheduler.acquire(RequestContext(Priority.NORMAL))
        waiting = asyncio.ensure_future(call(scheduler, RequestContext(Priority.BACKGROUND)))
        await asyncio.sleep(0)
        clock.now += 7.0
        scheduler.release(held)
        await waiting

    asyncio.run(scenario())


def test_a_merged_embed_queues_a_request_at_the_class_it_aged_to():
    """The merged embed's queue takes the most urgent class first: a background request the
    Router aged to high must not sort behind normal ones there."""
    submitted: list[int] = []

    async def call(scheduler, ctx):
        downstreams = Downstreams(FakeEmbedderHandle(), None, None, {"embedder": scheduler})
        merged = downstreams.embed_coalescer
        submit = merged.submit
        merged.submit = lambda items, priority: (
            submitted.append(priority) or submit(items, priority)
        )  # a spy around the real coalescer
        await downstreams.embed(["a text"], ctx)

    aged_background_call("embedder", call)
    assert submitted == [int(Priority.HIGH)]


def test_vllm_is_given_the_class_a_request_aged_to_not_the_one_it_asked_for():
    """vLLM orders its own queue by priority too: a background request the Router aged up
    after waiting must not sort behind every newer normal one there."""
    handle = FakeGeneratorHandle()

    async def call(scheduler, ctx):
        downstreams = Downstreams(None, None, handle, {"generator": scheduler})
        request = GenerationRequest("r", [("user", "hi")], 4, priority=int(Priority.BACKGROUND))
        await downstreams.generate(request, ctx)

    aged_background_call("generator", call)
    assert handle.sent[0].priority == int(Priority.HIGH)


def test_a_stream_tells_vllm_the_class_it_aged_to():
    handle = FakeStreamingGeneratorHandle()

    async def call(scheduler, ctx):
        downstreams = Downstreams(None, None, handle, {"generator": scheduler})
        request = GenerationRequest("r", [("user", "hi")], 4, priority=int(Priority.BACKGROUND))
        assert [d.text async for d in downstreams.generate_stream(request, ctx)] == ["text"]

    aged_background_call("generator", call)
    assert handle.sent[0].priority == int(Priority.HIGH)


class InProcessHandle:
    """A Serve handle to a deployment object in this process (no Ray here): `.m.remote(*args)`
    runs the real method `m` as a task, as the replica would, and records its name."""

    def __init__(self, target) -> None:
        self._target = target
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        method, calls = getattr(self._target, name), self.calls

        class Method:
            @staticmethod
            def remote(*args):
                calls.append(name)
                return asyncio.ensure_future(method(*args))

        return Method()


def test_concurrent_searches_reach_vector_search_as_one_merged_call():
    """Four requests search at once: the first search goes at once, the three made while it
    ran go together as the next call, and each request still gets its own hits."""

    async def scenario():
        searcher = VectorSearch.func_or_class(IN_MEMORY_SEARCH)
        vectors = np.eye(4, dtype=np.float32)
        memories = [NewMemory(f"m{i}", f"memory {i}") for i in range(4)]
        await searcher.upsert("ns", memories, vectors)
        handle = InProcessHandle(searcher)
        downstreams = Downstreams(None, handle, None)
        found = await asyncio.gather(
            *(downstreams.search(SearchQuery("ns", v, 1), RequestContext()) for v in vectors)
        )
        return [[hit.id for hit in hits] for hits in found], handle.calls

    found, calls = asyncio.run(scenario())
    assert found == [["m0"], ["m1"], ["m2"], ["m3"]]
    assert calls == ["search_many", "search_many"]


class FakeFullVectorSearchHandle:
    """VectorSearch's handle when every replica is at capacity (a fault Serve gives only under
    real overload): each merged call fails with Serve's BackPressureError."""

    def __init__(self) -> None:
        self.search_many = self

    def remote(self, queries):
        from ray.serve.exceptions import BackPressureError

        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(BackPressureError(num_queued_requests=1, max_queued_requests=1))
        return failed


def test_a_merged_search_that_finds_vector_search_full_is_a_503_for_each_request():
    async def scenario():
        downstreams = Downstreams(None, FakeFullVectorSearchHandle(), None)
        query = SearchQuery("ns", np.zeros(4, np.float32), 1)
        return await asyncio.gather(
            *(downstreams.search(query, RequestContext()) for _ in range(3)),
            return_exceptions=True,
        )

    assert [type(outcome) for outcome in asyncio.run(scenario())] == [Overloaded] * 3


def test_merged_calls_in_flight_follow_the_replicas_running():
    """`coalesce_max_in_flight` per replica of the deployment, shared by the Routers."""
    downstreams = Downstreams(None, None, None, router=RouterConfig(coalesce_max_in_flight=4))
    downstreams.follow_replicas({"Embedder": 2, "VectorSearch": 3}, routers=2)
    assert downstreams.embed_coalescer.max_in_flight == 4
    assert downstreams.search_coalescer.max_in_flight == 6
    downstreams.follow_replicas({}, routers=8)  # none running yet: at least one each
    assert downstreams.embed_coalescer.max_in_flight == 1
    assert downstreams.search_coalescer.max_in_flight == 1


class HungStatsHandle:
    """A downstream whose replica never answers `stats` (a fault no real replica gives on
    demand): its call is a future that only cancellation ends."""

    def __init__(self) -> None:
        self.stats = self
        self.cancelled = 0

    def remote(self) -> asyncio.Future:
        call = asyncio.get_running_loop().create_future()
        call.add_done_callback(lambda f: setattr(self, "cancelled", self.cancelled + f.cancelled()))
        return call


def test_stats_of_hung_downstreams_answer_within_one_timeout():
    """/healthz and the budget refresh wait on these: three hung downstreams cost one
    timeout, not three in turn, and each reports its error."""

    async def scenario():
        handles = [HungStatsHandle() for _ in range(3)]
        loop = asyncio.get_running_loop()
        start = loop.time()
        out = await Downstreams(*handles).stats(timeout_s=0.2)
        return out, loop.time() - start, handles

    out, took_s, handles = asyncio.run(scenario())
    assert out == {name: {"error": "TimeoutError"} for name in DEPLOYMENT_NAMES}
    assert took_s < 0.4 and [h.cancelled for h in handles] == [1, 1, 1]


def as_raised_in_a_replica(exc: MnemeError) -> MnemeError:
    """What a Serve handle call raises for `exc` raised in the downstream replica: Ray's
    RayTaskError subclassed from the error's own class (both at once)."""
    try:
        raise exc
    except MnemeError as raised:
        return RayTaskError("generate", "traceback", raised).as_instanceof_cause()


def test_an_error_raised_in_a_replica_keeps_its_retry_after_and_fields():
    """The Generator's 503 for a dead engine says when to retry: Ray's wrapper, of both
    classes, would answer with the class's defaults instead."""
    died = as_raised_in_a_replica(Unavailable("the engine died", retry_after_s=5.0))
    assert isinstance(died, Unavailable) and died.retry_after_s is None  # Ray's wrapper
    response = error_response(_translate(died, "Generator"))
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert b'"message":"the engine died"' in response.body

    invalid = as_raised_in_a_replica(InvalidRequest("bad", param="stop", code="too_many"))
    response = error_response(_translate(invalid, "Generator"))
    assert response.status_code == 400 and "retry-after" not in response.headers
    assert b'"param":"stop","code":"too_many"' in response.body
