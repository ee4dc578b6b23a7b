"""The Router's cache client: claims it made are never left to lapse, joins honour deadlines."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ray.serve.context import _RequestContext, _serve_request_context

from cache.client import CacheClient
from cache.keys import embedding_key
from cache.shard import CacheShard
from deployments.compute import ComputeGraph
from mneme.config import CacheConfig, MnemeConfig
from mneme.errors import Unavailable
from mneme.priority import Priority
from tests.clock import Clock


class FakeShardHandle:
    """A fake Ray actor handle around a real `CacheShard` in this process: the client's logic
    without Ray, and a fault Ray will not produce on demand (a lookup that answers, claiming
    its misses as the real shard does, only after the caller gave up)."""

    def __init__(self, shard: CacheShard, lookup_delay_s: float = 0.0):
        self.shard, self.lookup_delay_s = shard, lookup_delay_s
        self.released: list[str] = []
        self.lookup = self._method(self._lookup)
        self.release = self._method(self._release)
        self.await_keys = self._method(shard.await_keys)
        self.store = self._method(shard.store)
        self.bump_delay_s = 0.0
        self.bump_failures = 0  # the next bumps that fail (a shard restarting, say)
        self.bump = self._method(self._bump)
        self.settings = self._method(self._settings)
        self.stats_delay_s = 0.0
        self.stats = self._method(self._stats)

    @staticmethod
    def _method(function):
        class Ref:  # like Ray's ObjectRef: cancelling one await of it leaves the call running
            def __init__(self, call: asyncio.Future):
                self.call = call

            def __await__(self):
                return asyncio.shield(self.call).__await__()

        class Method:
            @staticmethod
            def remote(*args):
                return Ref(asyncio.ensure_future(function(*args)))

        return Method

    async def _lookup(self, requests):
        await asyncio.sleep(self.lookup_delay_s)
        return await self.shard.lookup(requests)

    async def _bump(self, namespace):
        await asyncio.sleep(self.bump_delay_s)
        if self.bump_failures > 0:
            self.bump_failures -= 1
            raise RuntimeError("shard restarting")
        return self.shard.bump(namespace)

    async def _settings(self):
        return self.shard.settings()

    async def _stats(self):
        await asyncio.sleep(self.stats_delay_s)
        return self.shard.stats()

    async def _release(self, keys, claim=None):
        self.released += keys
        self.shard.release(keys, claim)


def client_of(config: CacheConfig, *handles: FakeShardHandle) -> CacheClient:
    client = CacheClient.__new__(CacheClient)  # no Ray: its shards are `handles`
    client.config, client.shards, client._background = config, list(handles), set()
    client._last_shard_stats = {}
    client._rebumping = set()
    client._lookups = client._stores = None
    client.joined_misses_computed = 0
    return client


def test_a_lookup_that_answers_after_its_timeout_has_its_claims_released():
    async def scenario():
        config = CacheConfig(actor_timeout_s=0.05)
        late = FakeShardHandle(CacheShard(config), lookup_delay_s=0.2)
        key = embedding_key("model", "hello")
        assert await client_of(config, late)._lookup(0, [key]) is None  # timed out: no claim
        await asyncio.sleep(0.3)  # the late answer arrives, with its claim
        assert late.released == [late.shard.full_key(key)]
        assert (await late.shard.lookup([key])).owned == late.released  # nobody waits on it

    asyncio.run(scenario())


def test_a_joined_miss_is_waited_for_no_longer_than_the_request_has_left():
    """single_flight_wait_s is 30 s; a request with 0.1 s left computes the value itself."""

    async def scenario():
        config = CacheConfig()
        handle = FakeShardHandle(CacheShard(config))
        key = embedding_key("model", "slow to compute")
        assert (await handle.shard.lookup([key])).owned  # another request owns it, slowly
        computed = []

        async def compute(indices: list[int]) -> list[bytes]:
            computed.append(indices)
            return [b"computed here"]

        client = client_of(config, handle)
        joined = client.get_or_compute([key], compute, wait_s=0.1)
        assert await asyncio.wait_for(joined, 5.0) == [b"computed here"]
        assert computed == [[0]]

    asyncio.run(scenario())


def test_an_urgent_request_waits_for_a_less_urgent_owner_only_briefly():
    """The background owner of a miss is stuck (queued behind more urgent work, say): a
    critical request that joins it computes the value itself after `hedge_after_ms`, and
    stores it, so the owner's other joiners get it too; one of the owner's class waits."""

    async def scenario():
        config = CacheConfig(hedge_after_ms=50)
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        key = embedding_key("model", "wanted by all")
        stuck = asyncio.Event()

        async def background_compute(indices: list[int]) -> list[bytes]:
            await stuck.wait()
            return [b"background's"]

        calls = 0

        async def compute(indices: list[int]) -> list[bytes]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.1)
            return [b"critical's"]

        def ask(priority: Priority, how=background_compute):
            return asyncio.ensure_future(client.get_or_compute([key], how, priority=priority))

        background = ask(Priority.BACKGROUND)
        await asyncio.sleep(0.05)  # it owns the miss now
        joiner = ask(Priority.BACKGROUND)
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        critical = ask(Priority.CRITICAL, compute)
        await asyncio.sleep(0.1)  # it gave up on the owner: computing now
        second = ask(Priority.CRITICAL, compute)  # waits for the first, not the owner
        assert await asyncio.wait_for(critical, 1.0) == [b"critical's"]
        waited = asyncio.get_running_loop().time() - started
        assert await asyncio.wait_for(second, 1.0) == [b"critical's"]
        assert await asyncio.wait_for(joiner, 1.0) == [b"critical's"]
        stuck.set()
        assert await background == [b"background's"]
        return (
            waited,
            calls,
            client.joined_misses_computed,
            handle.shard.stats()["kinds"]["embedding"],
        )

    waited, calls, hedged, stats = asyncio.run(scenario())
    assert 0.05 <= waited < 0.5 and calls == 1 and hedged == 1
    assert stats["joined"] == 3 and stats["outranked"] == 1


def test_an_owner_failing_after_its_claim_lapsed_leaves_the_new_claim_alone():
    """A's computation outlives `single_flight_wait_s`, so B claims the key again and C joins
    B. A then fails: its release must not wake C empty-handed (C would compute it again)."""

    async def scenario():
        clock = Clock()
        config = CacheConfig(single_flight_wait_s=5.0)
        handle = FakeShardHandle(CacheShard(config, timer=clock))
        client = client_of(config, handle)
        key = embedding_key("model", "slow, then failing")
        a_fails, b_done = asyncio.Event(), asyncio.Event()
        computed_by = []

        async def compute_a(indices):
            await a_fails.wait()
            raise RuntimeError("A's model call failed")

        async def compute_b(indices):
            computed_by.append("B")
            await b_done.wait()
            return [b"B's"]

        async def compute_c(indices):
            computed_by.append("C")
            return [b"C's"]

        a = asyncio.ensure_future(client.get_or_compute([key], compute_a))
        await asyncio.sleep(0.01)
        clock.now += 10.0  # A's claim lapses
        b = asyncio.ensure_future(client.get_or_compute([key], compute_b))
        await asyncio.sleep(0.01)
        c = asyncio.ensure_future(client.get_or_compute([key], compute_c))
        await asyncio.sleep(0.01)
        a_fails.set()
        with pytest.raises(RuntimeError):
            await a
        await asyncio.sleep(0.05)  # A's release reaches the shard
        woke_empty = c.done()
        b_done.set()
        return await b, await asyncio.wait_for(c, 5.0), woke_empty, computed_by, client

    b, c, woke_empty, computed_by, client = asyncio.run(scenario())
    assert b == c == [b"B's"] and not woke_empty
    assert computed_by == ["B"] and client.joined_misses_computed == 0


class OlderShardHandle(FakeShardHandle):
    """A shard actor of an older release (detached actors outlive a deploy): its lookups
    carry no claim number and its `release` takes keys only."""

    async def _lookup(self, requests):
        lookup = await super()._lookup(requests)
        lookup.claim = None
        return lookup

    async def _release(self, keys):
        await super()._release(keys)


def test_a_failed_owner_releases_its_claims_on_a_shard_of_an_older_release():
    async def scenario():
        config = CacheConfig()
        handle = OlderShardHandle(CacheShard(config))
        client = client_of(config, handle)
        key = embedding_key("model", "failing on an old shard")

        async def failing(indices):
            raise RuntimeError("the model call failed")

        with pytest.raises(RuntimeError):
            await client.get_or_compute([key], failing)
        await asyncio.sleep(0.01)
        return handle, await handle.shard.lookup([key])

    handle, again = asyncio.run(scenario())
    assert handle.released == again.keys and again.owned == again.keys


def test_a_write_whose_cache_cannot_be_invalidated_is_not_acknowledged():
    """The write stands (it is durable) but the client hears 503, not 200: its namespace's
    cached searches could be served stale until the shard applies the bump."""

    async def scenario():
        config = CacheConfig(bump_timeout_s=0.05)
        handle = FakeShardHandle(CacheShard(config))
        graph = ComputeGraph(MnemeConfig(), downstreams=None, cache=client_of(config, handle))
        written = []

        async def write(gone) -> str:
            written.append("a")
            return "stored"

        before = handle.shard.version("ns")
        assert await graph._write("ns", write) == "stored"
        assert handle.shard.version("ns") != before
        handle.bump_delay_s = 0.2  # the shard is too slow to confirm the bump
        with pytest.raises(Unavailable, match="is stored"):
            await graph._write("ns", write)
        assert written == ["a", "a"]

    asyncio.run(scenario())


def test_a_bump_no_shard_confirmed_is_retried_in_the_background_until_it_is():
    """The write is answered 503 (stored, not yet invalidated); the Router goes on bumping,
    so its namespace's older results stop being served without waiting for another write."""

    async def scenario():
        config = CacheConfig(bump_timeout_s=0.01)
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        graph = ComputeGraph(MnemeConfig(), downstreams=None, cache=client)

        async def write(gone) -> str:
            return "stored"

        before = handle.shard.version("ns")
        handle.bump_failures = 5  # the request's 3 attempts fail, then 2 retries
        with pytest.raises(Unavailable, match="keeps trying"):
            await graph._write("ns", write)
        assert handle.shard.version("ns") == before and client._rebumping == {"ns"}
        handle.bump_failures = 5  # a second failed write does not start a second retrier
        with pytest.raises(Unavailable):
            await graph._write("ns", write)
        assert len(client._background) == 1
        for _ in range(200):
            if handle.shard.version("ns") != before:
                break
            await asyncio.sleep(0.01)
        assert handle.shard.version("ns") != before
        assert handle.bump_failures == 0 and not client._rebumping

    asyncio.run(scenario())


def test_a_write_outlives_its_cancelled_request_and_is_bumped_after_it_lands():
    """A client that disconnects mid-write: the write runs on outside the request's Serve
    context (Serve would cancel it as the request's child), and the namespace's version
    moves only once it has landed; bumped before, a search in between would cache the old
    view under the new version."""

    async def scenario():
        config = CacheConfig()
        handle = FakeShardHandle(CacheShard(config))
        graph = ComputeGraph(MnemeConfig(), downstreams=None, cache=client_of(config, handle))
        lands, contexts = asyncio.Event(), []

        async def write(gone) -> str:
            contexts.append(_serve_request_context.get())
            await lands.wait()
            return "stored"

        async def request() -> str:
            _serve_request_context.set(_RequestContext(_internal_request_id="r1"))
            return await graph._write("ns", write)

        before = handle.shard.version("ns")
        client = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        client.cancel()  # the client went away mid-write
        await asyncio.sleep(0.01)
        assert handle.shard.version("ns") == before  # not before the write lands
        lands.set()
        await asyncio.sleep(0.05)
        assert handle.shard.version("ns") != before
        assert contexts[0] is None or contexts[0]._internal_request_id != "r1"

    asyncio.run(scenario())


def test_settings_the_running_cache_actors_keep_are_reported():
    """The shard actors are detached and named: a redeploy finds them running with the
    settings they started with, which the Router reports instead of silently ignoring."""

    async def scenario():
        started = CacheConfig(max_entries=1000)
        handle = FakeShardHandle(CacheShard(started))
        configured = CacheConfig(max_entries=5000, actor_timeout_s=9.0)  # the latter: Router's
        assert await client_of(configured, handle).stale_settings() == {"max_entries": (1000, 5000)}
        assert await client_of(started, handle).stale_settings() == {}

    asyncio.run(scenario())


def test_the_summed_stats_keep_a_silent_shards_last_answer():
    """A shard that does not answer the stats call in time is summed as it last answered:
    its counters leaving the sum would read as the service's counters going backwards."""

    async def scenario():
        config = CacheConfig(actor_timeout_s=0.05)
        handles = [FakeShardHandle(CacheShard(config, shard=i)) for i in range(2)]
        client = client_of(config, *handles)
        for i, handle in enumerate(handles):
            await handle.shard.lookup([embedding_key("model", f"text {i}")])  # a miss each
        first = await client.stats()
        handles[1].stats_delay_s = 0.2  # busy: no answer within actor_timeout_s
        return first, await client.stats()

    first, second = asyncio.run(scenario())
    assert first["kinds"]["embedding"]["misses"] == second["kinds"]["embedding"]["misses"] == 2
    assert (first["shards_answering"], second["shards_answering"]) == (2, 1)
    assert list(second["by_shard"]) == ["0"]


def test_joiners_whose_deadlines_cut_their_waits_do_not_keep_a_gone_owners_claim():
    """An owner claims a key and is gone (its Router died): it never stores nor releases.
    Each joiner's wait is cut by its deadline, and the shard renews the claim for it as it
    takes the computation over; the joiner then fails its deadline. Its failure gives the
    claim back, so the claim lapses and a later request computes the key."""

    async def scenario():
        config = CacheConfig(single_flight_wait_s=0.3)
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        key = embedding_key("model", "z")
        await handle.shard.lookup([key])  # the owner that is gone
        loop, outcomes = asyncio.get_running_loop(), []
        for _ in range(12):  # 1.2 s of requests with 0.1 s left each: 4 x the claim's life
            start = loop.time()

            async def compute(indices, start=start):
                if loop.time() - start >= 0.1:  # what Downstreams does past the deadline
                    raise TimeoutError("deadline passed before calling Embedder")
                return [b"v"] * len(indices)

            try:
                await client.get_or_compute([key], compute, wait_s=0.1)
                outcomes.append("ok")
            except TimeoutError:
                outcomes.append("deadline")
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == "deadline" and "ok" in outcomes, outcomes


def test_a_request_cancelled_between_its_lookup_and_its_computes_gives_its_claims_back():
    """A cancellation that lands anywhere between the lookup (which claimed the miss) and
    the store, the first step of the compute task included: no claim is left for joiners to
    wait out. (The lookup is wrapped to cancel the request after 1 to 8 turns of the event
    loop, a sweep over the race Ray will not produce on demand; not within the lookup's own
    step, where nothing but this wrapper could cancel the request.)"""

    async def scenario(turns: int):
        config = CacheConfig()
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        loop, request = asyncio.get_running_loop(), {}
        lookup = client._lookup

        def cancel_after(turns: int) -> None:
            if turns == 0:
                request["task"].cancel()
            else:
                loop.call_soon(cancel_after, turns - 1)

        async def lookup_then_cancel_the_request(shard, requests, priority):
            found = await lookup(shard, requests, priority)
            cancel_after(turns)
            return found

        client._lookup = lookup_then_cancel_the_request

        async def compute(indices):
            return [b"v"] * len(indices)

        request["task"] = asyncio.ensure_future(
            client.get_or_compute([embedding_key("model", "x")], compute)
        )
        try:
            await request["task"]
        except asyncio.CancelledError:
            pass
        await asyncio.sleep(0.01)
        return handle.shard._inflight

    assert [asyncio.run(scenario(turns)) for turns in range(1, 9)] == [{}] * 8


def test_a_request_cancelled_as_its_merged_lookup_answers_gives_its_claims_back():
    """The merged lookup hands this request its part (with a claimed miss), and the request
    is cancelled before it resumes: the part is given back. (The split is wrapped to cancel
    at that moment: a race Ray will not produce on demand.)"""
    from cache.client import split_lookup
    from mneme.coalesce import Coalescer

    async def scenario():
        config = CacheConfig()
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        loop, request = asyncio.get_running_loop(), {}

        def split_then_cancel_the_request(lookup, sizes):
            loop.call_soon(request["task"].cancel)
            return split_lookup(lookup, sizes)

        client._lookups = [
            Coalescer(
                lambda requests: client._claiming_lookup(0, requests),
                split=split_then_cancel_the_request,
                orphaned=lambda part: client._release(0, part.owned, part.claim),
            )
        ]

        async def compute(indices):
            return [b"v"] * len(indices)

        request["task"] = asyncio.ensure_future(
            client.get_or_compute([embedding_key("model", "y")], compute)
        )
        with pytest.raises(asyncio.CancelledError):
            await request["task"]
        await asyncio.sleep(0.05)
        return handle

    handle = asyncio.run(scenario())
    assert len(handle.released) == 1 and handle.shard._inflight == {}


class EmbeddingAndStoringDownstreams:
    """The Embedder and VectorSearch calls an add makes, answered in this process (the
    fault under test is the cache shard's, which FakeShardHandle gives)."""

    def __init__(self) -> None:
        self.stored: list[str] = []

    async def embed(self, texts, ctx):
        from mneme.records import Embeddings

        return Embeddings(np.ones((len(texts), 4), dtype=np.float32), [1] * len(texts))

    async def upsert(self, namespace, items, vectors, ctx, gone):
        self.stored += [item.id for item in items]
        return [item.id for item in items]


def test_an_add_answered_503_names_the_ids_it_stored_so_a_retry_replaces_them():
    """The write stands but its namespace's cached results could not be invalidated: the
    503 carries the ids the Router gave the items that came without one, so retrying with
    them replaces the memories instead of storing them twice."""
    from deployments.serving import MnemeService
    from mneme import protocol as p
    from mneme.priority import RequestContext

    async def scenario():
        config = CacheConfig(bump_timeout_s=0.01)
        handle = FakeShardHandle(CacheShard(config))
        handle.bump_failures = 10**6  # the shard never confirms
        down = EmbeddingAndStoringDownstreams()
        graph = ComputeGraph(MnemeConfig(), down, cache=client_of(config, handle))
        service = MnemeService(MnemeConfig(), graph)
        items = [{"text": "tea at 5"}, {"text": "coffee at 9", "id": "mine"}]
        request = p.AddMemoriesRequest(namespace="ns", items=items)
        with pytest.raises(Unavailable) as refused:
            await service.add_memories(request, RequestContext())
        return refused.value.to_body()["error"], down.stored

    error, stored = asyncio.run(scenario())
    assert error["code"] == "unavailable" and error["ids"] == stored
    assert stored[0].startswith("mem_") and stored[1] == "mine"


def test_a_joiner_that_fails_leaves_a_live_owners_claim_to_the_others_waiting():
    """The owner is slow but alive; a joiner whose deadline is short fails; the joiners that
    can wait get the owner's value, none computes it again."""

    async def scenario():
        config = CacheConfig(single_flight_wait_s=5.0)
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        key, computes = embedding_key("model", "hot"), []

        def computer(name: str, seconds: float, fails: bool = False):
            async def compute(indices):
                computes.append(name)
                await asyncio.sleep(seconds)
                if fails:
                    raise TimeoutError(f"{name}: deadline passed")
                return [name.encode()] * len(indices)

            return compute

        def request(name: str, seconds: float, wait_s=None, fails=False):
            compute = computer(name, seconds, fails)
            return asyncio.ensure_future(client.get_or_compute([key], compute, wait_s=wait_s))

        owner = request("owner", 0.5)
        await asyncio.sleep(0.01)
        short = request("short", 0.0, wait_s=0.1, fails=True)
        await asyncio.sleep(0.01)
        patient = [request(f"patient{i}", 0.5) for i in range(3)]
        results = await asyncio.gather(owner, short, *patient, return_exceptions=True)
        return computes, results

    computes, results = asyncio.run(scenario())
    assert computes == ["owner", "short"]
    assert isinstance(results[1], TimeoutError)
    assert [r for i, r in enumerate(results) if i != 1] == [[b"owner"]] * 4


def test_a_failed_joined_miss_does_not_give_up_the_requests_own_miss_still_computing():
    """One request owns k1 (slow) and joined k2, whose owner is gone; its compute of k2
    fails first. Its own k1 is still computed and stored: another waiter on k1 gets it."""

    async def scenario():
        config = CacheConfig(single_flight_wait_s=5.0)
        handle = FakeShardHandle(CacheShard(config))
        client = client_of(config, handle)
        k1, k2 = embedding_key("model", "one"), embedding_key("model", "two")
        await handle.shard.lookup([k2])  # its owner is gone
        computes = []

        async def compute(indices):
            computes.append(("request", indices))
            if indices == [1]:  # k2, after its wait of 0.1 s
                raise TimeoutError("k2: deadline passed")
            await asyncio.sleep(0.3)
            return [b"k1"] * len(indices)

        async def waiter_compute(indices):
            computes.append(("waiter", indices))
            return [b"waiter's"] * len(indices)

        first = asyncio.ensure_future(client.get_or_compute([k1, k2], compute, wait_s=0.1))
        await asyncio.sleep(0.02)
        waiter = asyncio.ensure_future(client.get_or_compute([k1], waiter_compute))
        results = await asyncio.gather(first, waiter, return_exceptions=True)
        return computes, results, handle.released

    computes, results, released = asyncio.run(scenario())
    assert isinstance(results[0], TimeoutError) and results[1] == [b"k1"]
    assert ("waiter", [0]) not in computes and released == []
