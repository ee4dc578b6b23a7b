"""A cache shard without Ray: tiers, versions, single flight, isolation, Redis outages."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import random
import time

import numpy as np
import pytest

from cache.client import aggregate
from cache.keys import Kind, embedding_key, namespaced_key, prompt_key
from cache.shard import CacheShard, Lookup
from mneme.config import CacheConfig
from mneme.priority import Priority
from tests.clock import Clock


def run(coro):
    return asyncio.run(coro)


def asked_at(shard: CacheShard, key, priority: Priority):
    """A lookup of `key` by a request of class `priority`."""
    return shard.lookup([dataclasses.replace(key, priority=priority)])


def search_key(namespace: str, query: str):
    return namespaced_key(Kind.SEARCH, "m", namespace, [query, 5, None])


async def fill(shard: CacheShard, request, value: bytes) -> str:
    lookup = await shard.lookup([request])
    assert lookup.owned, "expected a miss to own"
    await shard.store([(lookup.owned[0], request.kind, value)])
    return lookup.owned[0]


def test_miss_then_l1_hit():
    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "hello")
        first = await shard.lookup([key])
        await shard.store([(first.owned[0], Kind.EMBEDDING, b"v")])
        second = await shard.lookup([key])
        return first, second, shard.stats()["kinds"]["embedding"]

    first, second, stats = run(go())
    assert first.found == {} and len(first.owned) == 1
    assert second.found == {second.keys[0]: (b"v", "hit-l1")}
    assert stats["hits_l1"] == 1 and stats["misses"] == 1 and stats["hit_rate"] == 0.5


def test_normalised_text_shares_an_embedding_key():
    assert embedding_key("m", "  hello   world ") == embedding_key("m", "hello world")
    assert embedding_key("m", "hello") != embedding_key("other-model", "hello")
    assert embedding_key("m", "Hello") != embedding_key("m", "hello")


def test_a_write_bumps_the_version_so_old_results_are_unreachable():
    async def go():
        shard = CacheShard(CacheConfig())
        request = search_key("ns", "q")
        await fill(shard, request, b"old result")
        hit = await shard.lookup([request])
        shard.bump("ns")
        after = await shard.lookup([request])
        other = await shard.lookup([search_key("other-ns", "q")])
        return hit, after, other

    hit, after, other = run(go())
    assert list(hit.found.values()) == [(b"old result", "hit-l1")]
    assert after.found == {} and after.keys != hit.keys
    assert other.found == {}


def test_a_generation_outlives_a_version_bump_but_not_its_namespace():
    prompt = [[("system", "Memories:\n- tea at 5"), ("user", "when is tea?")], 16, 0.0]

    def generation(namespace):
        return prompt_key(Kind.GENERATION, "llm", prompt, namespace)

    async def go():
        shard = CacheShard(CacheConfig())
        await fill(shard, generation("ns"), b"at 5")
        shard.bump("ns")  # an add elsewhere in the namespace: the same prompt, the same answer
        after_bump = await shard.lookup([generation("ns")])
        other = await shard.lookup([generation("other-ns")])
        plain_chat = await shard.lookup([prompt_key(Kind.CHAT, "llm", prompt, None)])
        return after_bump, other, plain_chat

    after_bump, other, plain_chat = run(go())
    assert list(after_bump.found.values()) == [(b"at 5", "hit-l1")]
    assert other.found == {} and other.keys != after_bump.keys
    assert plain_chat.found == {}


def test_single_flight_n_concurrent_misses_compute_once():
    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "popular")
        computed = 0

        async def caller():
            nonlocal computed
            lookup = await shard.lookup([key])
            if lookup.owned:
                computed += 1
                await asyncio.sleep(0.05)  # the computation
                await shard.store([(lookup.owned[0], Kind.EMBEDDING, b"vec")])
                return b"vec"
            if lookup.pending:
                return (await shard.await_keys(lookup.pending, 5.0))[lookup.pending[0]]
            return lookup.found[lookup.keys[0]][0]

        results = await asyncio.gather(*(caller() for _ in range(20)))
        return computed, results, shard.stats()["kinds"]["embedding"]["joined"]

    computed, results, joined = run(go())
    assert computed == 1 and results == [b"vec"] * 20 and joined == 19


def test_a_join_says_how_urgent_its_owner_is():
    """A more urgent joiner waits for it only briefly (the owner may wait long for a slot)."""

    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "asked by everyone")

        owner = await asked_at(shard, key, Priority.LOW)
        classes = (Priority.CRITICAL, Priority.LOW, Priority.BACKGROUND)
        joins = {p: await asked_at(shard, key, p) for p in classes}
        return owner, joins, shard.stats()["kinds"]["embedding"]

    owner, joins, stats = run(go())
    full = owner.keys[0]
    assert owner.owned == [full]
    assert all(j.pending == [full] and not j.owned for j in joins.values())
    assert all(j.owners == {full: Priority.LOW} for j in joins.values())
    assert stats["joined"] == 3 and stats["outranked"] == 1


def test_outranked_joins_are_counted_per_request_in_a_merged_lookup():
    """The Router merges concurrent requests' lookups: each urgent one counts."""

    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "asked by a merged lookup")
        await asked_at(shard, key, Priority.LOW)
        asking = (Priority.CRITICAL, Priority.CRITICAL, Priority.BACKGROUND, Priority.HIGH)
        merged = [dataclasses.replace(key, priority=p) for p in asking]
        joined = await shard.lookup(merged)
        return joined, shard.stats()["kinds"]["embedding"]

    joined, stats = run(go())
    assert joined.pending == [joined.keys[0]]
    assert stats["joined"] == 4 and stats["outranked"] == 3


def test_a_waiter_that_gives_up_on_a_less_urgent_owner_takes_its_class_to_the_claim():
    """It computes the value itself now: later joiners of its class wait for it."""

    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "slow for the background")

        owner = await asked_at(shard, key, Priority.BACKGROUND)
        hedger = await asked_at(shard, key, Priority.CRITICAL)
        assert hedger.owners == {owner.keys[0]: Priority.BACKGROUND}
        assert await shard.await_keys(hedger.pending, 0.01, Priority.CRITICAL) == {}
        return owner, await asked_at(shard, key, Priority.HIGH)

    owner, later = run(go())
    assert later.pending == owner.keys and later.owners == {owner.keys[0]: Priority.CRITICAL}


def test_a_failed_owner_releases_its_waiters():
    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "doomed")
        owner = await shard.lookup([key])
        waiter = await shard.lookup([key])
        waiting = asyncio.create_task(shard.await_keys(waiter.pending, 5.0))
        await asyncio.sleep(0.01)
        shard.release(owner.owned, owner.claim)
        started = time.monotonic()
        got = await waiting
        return got, time.monotonic() - started, await shard.lookup([key])

    got, waited_s, again = run(go())
    assert got == {} and waited_s < 1.0
    assert again.owned == again.keys  # nobody holds it now: the next caller computes


def test_a_release_drops_only_the_claims_of_its_own_lookup():
    """An owner's claim lapses (`single_flight_wait_s`) and another lookup claims the key
    again: the first owner's late release leaves that claim, and its waiter, alone."""

    async def go():
        clock = Clock()
        shard = CacheShard(CacheConfig(single_flight_wait_s=1.0), timer=clock)
        key = embedding_key("m", "claimed twice")
        first = await shard.lookup([key])
        clock.now += 2.0
        second = await shard.lookup([key])
        waiter = await shard.lookup([key])
        waiting = asyncio.create_task(shard.await_keys(waiter.pending, 5.0))
        shard.release(first.owned, first.claim)
        await asyncio.sleep(0.01)
        still_waiting = not waiting.done()
        await shard.store([(second.owned[0], Kind.EMBEDDING, b"second's")])
        return first, second, still_waiting, await waiting

    first, second, still_waiting, got = run(go())
    assert first.owned == second.owned and first.claim != second.claim
    assert still_waiting and got == {second.owned[0]: b"second's"}


def test_a_semantic_answer_expires_with_the_answer_ttl():
    """A similar question is not served an answer older than `ttl_s.answer`, as the answer
    cache itself would not serve it."""
    clock = Clock(0.0)
    shard = CacheShard(CacheConfig(ttl_s={"answer": 600.0}), timer=clock)
    q = np.ones(4, dtype=np.float32) / 2.0
    version, _ = shard.semantic_lookup("ns", "b", q, 0.9)
    shard.semantic_add("ns", "b", version, q, b"old")
    clock.now = 500.0
    shard.semantic_add("ns", "b", version, q * 0.999, b"newer")
    clock.now = 599.0
    assert shard.semantic_lookup("ns", "b", q, 0.9)[1] == b"old"  # still the closest
    clock.now = 601.0
    assert shard.semantic_lookup("ns", "b", q, 0.9)[1] == b"newer"
    clock.now = 1101.0
    assert shard.semantic_lookup("ns", "b", q, 0.9)[1] is None
    assert shard._semantic_size == 0


@pytest.mark.redis
def test_claims_keep_their_lookup_s_number_across_the_l2_read(redis_server):
    """Lookups run side by side while each awaits Redis: each claim must carry its own
    lookup's number, or its owner's release would drop nothing (or another's claim)."""

    async def go():
        shard = CacheShard(CacheConfig(redis_url=redis_server.url, l2_timeout_s=0.5))
        first_key, second_key = embedding_key("m", "first"), embedding_key("m", "second")
        first, second = await asyncio.gather(shard.lookup([first_key]), shard.lookup([second_key]))
        shard.release(first.owned, first.claim)
        shard.release(second.owned, second.claim)
        return first, second, await shard.lookup([first_key, second_key])

    first, second, again = run(go())
    assert first.owned and second.owned and first.claim != second.claim
    assert again.owned == again.keys  # both released by their owners


def test_a_release_without_a_claim_number_drops_any_claim():
    """What a client of an older release sends."""

    async def go():
        shard = CacheShard(CacheConfig())
        key = embedding_key("m", "released the old way")
        owner = await shard.lookup([key])
        shard.release(owner.owned)
        return await shard.lookup([key])

    assert run(go()).owned  # nobody holds it: the next caller owns it


def test_randomized_isolation_across_namespaces_and_versions():
    """No lookup ever hits a value stored for another namespace or an older version."""

    async def go():
        rng = random.Random(1234)
        shard = CacheShard(CacheConfig())
        namespaces = [f"tenant-{i}" for i in range(12)] + ["a:b", "a", "b", "a.b"]
        payloads = [f"query {i}" for i in range(25)]
        stored: dict[tuple[str, str, str], bytes] = {}
        for step in range(3000):
            ns, payload = rng.choice(namespaces), rng.choice(payloads)
            if rng.random() < 0.1:
                shard.bump(ns)
                continue
            request = search_key(ns, payload)
            version = shard.version(ns)
            lookup = await shard.lookup([request])
            if lookup.found:
                value, _ = lookup.found[lookup.keys[0]]
                assert value == stored[(ns, version, payload)], (ns, version, payload)
            elif lookup.owned:
                value = f"{ns}|{version}|{payload}|{step}".encode()
                stored[(ns, version, payload)] = value
                await shard.store([(lookup.owned[0], Kind.SEARCH, value)])
        return len(stored)

    assert run(go()) > 500


@pytest.mark.redis
def test_l2_hit_is_promoted_to_l1(redis_server):
    async def go():
        config = CacheConfig(redis_url=redis_server.url, l2_timeout_s=0.5)
        writer = CacheShard(config)
        key = embedding_key("m", "shared text")
        await fill(writer, key, b"vector")
        await writer.flush()
        reader = CacheShard(config)  # a fresh L1 (e.g. a restarted actor), the same Redis
        first = await reader.lookup([key])
        second = await reader.lookup([key])
        return first, second

    first, second = run(go())
    assert list(first.found.values()) == [(b"vector", "hit-l2")]
    assert list(second.found.values()) == [(b"vector", "hit-l1")]


@pytest.mark.redis
def test_an_l2_hit_copied_into_l1_expires_when_it_does_in_redis(redis_server):
    """Copied with a fresh TTL, a value would outlive its TTL by up to a whole TTL in L1
    (longer once hot): it must keep what it had left."""

    async def go():
        config = CacheConfig(redis_url=redis_server.url, l2_timeout_s=0.5, ttl_s={"embedding": 0.4})
        writer, reader = CacheShard(config), CacheShard(config)
        key = embedding_key("m", "short-lived")
        await fill(writer, key, b"vector")
        await writer.flush()
        await asyncio.sleep(0.25)
        copied = await reader.lookup([key])  # 0.15 s left
        await asyncio.sleep(0.25)  # gone in Redis; a fresh 0.4 s TTL would still serve it
        return copied, await reader.lookup([key], claim=False)

    copied, later = run(go())
    assert list(copied.found.values()) == [(b"vector", "hit-l2")]
    assert later.found == {}


def test_a_waiter_on_a_lapsed_claim_wakes_when_the_key_is_stored():
    """A owns K; W joins; A's claim lapses and B takes K over; then A stores K after all.
    W must wake then with A's value, not wait out its whole timeout and compute K again."""

    async def go():
        clock = Clock(0.0)
        shard = CacheShard(CacheConfig(single_flight_wait_s=30.0), timer=clock)
        key = embedding_key("m", "slow to compute")
        a = await shard.lookup([key])
        clock.now = 29.0
        w = await shard.lookup([key])
        assert w.pending == w.keys
        waiting = asyncio.ensure_future(shard.await_keys(w.pending, timeout_s=5.0))
        await asyncio.sleep(0)
        clock.now = 31.0  # A's claim lapsed
        b = await shard.lookup([key])
        assert b.owned == b.keys  # B took K over
        started = time.perf_counter()
        await shard.store([(a.owned[0], Kind.EMBEDDING, b"from A")])
        found = await waiting
        return found, time.perf_counter() - started

    found, waited = run(go())
    assert list(found.values()) == [b"from A"] and waited < 1.0


def test_only_live_claims_count_as_in_flight():
    """A claim whose owner went away (its Router replica died before storing) lapses after
    `single_flight_wait_s`: the stats stop counting it then."""

    async def go():
        clock = Clock(0.0)
        shard = CacheShard(CacheConfig(single_flight_wait_s=30.0), timer=clock)
        await shard.lookup([embedding_key("m", "orphaned")])
        during = shard.stats()["inflight"]
        clock.now = 31.0
        return during, shard.stats()["inflight"]

    assert run(go()) == (1, 0)


@pytest.mark.redis
def test_versions_do_not_survive_a_restart_so_l2_never_serves_stale(redis_server):
    async def go():
        config = CacheConfig(redis_url=redis_server.url, l2_timeout_s=0.5)
        before = CacheShard(config)
        await fill(before, search_key("ns", "q"), b"result at version 0")
        await before.flush()
        after_restart = CacheShard(config)  # it never saw the writes that bumped versions
        return await after_restart.lookup([search_key("ns", "q")])

    assert run(go()).found == {}


@pytest.mark.redis
def test_redis_killed_then_restarted(redis_server):
    async def go():
        config = CacheConfig(
            redis_url=redis_server.url, l2_timeout_s=0.05, l2_breaker_cooldown_s=0.2
        )
        shard = CacheShard(config)
        await fill(shard, embedding_key("m", "before"), b"1")
        await shard.flush()
        redis_server.stop()
        outage = []
        for i in range(10):  # every lookup still answers: L1 hits and misses, no errors
            lookup = await shard.lookup(
                [embedding_key("m", "before"), embedding_key("m", f"new {i}")]
            )
            outage.append(lookup)
            await shard.store([(lookup.owned[0], Kind.EMBEDDING, b"x")]) if lookup.owned else None
        await shard.flush()  # the stores' background writes to Redis, refused or failed
        errors_during = shard.stats()["l2"]
        redis_server.start()
        await asyncio.sleep(0.3)  # past the breaker's cooldown
        await fill(shard, embedding_key("m", "after"), b"2")
        await shard.flush()
        fresh = CacheShard(config)
        return outage, errors_during, await fresh.lookup([embedding_key("m", "after")])

    outage, errors_during, after = run(go())
    assert all(lookup.found.get(lookup.keys[0]) == (b"1", "hit-l1") for lookup in outage)
    # the breaker opened after its 3 failures: the rest were not Redis errors, not asked
    assert errors_during["errors"] <= 5 and errors_during["skipped_while_open"] >= 10
    assert list(after.found.values()) == [(b"2", "hit-l2")]


def test_semantic_answers_match_similar_queries_within_one_version():
    rng = np.random.default_rng(0)
    q = rng.normal(size=16).astype(np.float32)
    q /= np.linalg.norm(q)
    near = q + 0.05 * rng.normal(size=16).astype(np.float32)
    near /= np.linalg.norm(near)
    far = rng.normal(size=16).astype(np.float32)
    far /= np.linalg.norm(far)

    shard = CacheShard(CacheConfig(semantic_answer_threshold=0.9))
    version, found = shard.semantic_lookup("ns", "b", q, 0.9)
    assert found is None
    assert shard.semantic_add("ns", "b", version, q, b"answer")
    assert float(near @ q) > 0.9 > float(far @ q)
    assert shard.semantic_lookup("ns", "b", near, 0.9) == (version, b"answer")
    assert shard.semantic_lookup("ns", "b", far, 0.9)[1] is None
    assert shard.semantic_lookup("ns", "other-params", q, 0.9)[1] is None
    assert shard.semantic_lookup("other-ns", "b", q, 0.9)[1] is None
    shard.bump("ns")
    assert shard.semantic_lookup("ns", "b", q, 0.9)[1] is None
    # an answer computed before the bump is refused, not registered under the new version
    assert not shard.semantic_add("ns", "b", version, q, b"stale")
    assert shard.semantic_lookup("ns", "b", q, 0.9)[1] is None


@pytest.mark.redis
def test_a_store_landing_during_the_l2_read_is_not_recomputed(redis_server):
    """B misses L1 and waits on Redis; meanwhile A stores: B must see A's value, not own it."""

    async def go():
        shard = CacheShard(CacheConfig(redis_url=redis_server.url, l2_timeout_s=0.5))
        key = embedding_key("m", "raced")
        owner = await shard.lookup([key])
        real_get = shard.l2.get_many_with_ttl

        async def slow_get(keys):
            await shard.store([(owner.owned[0], Kind.EMBEDDING, b"v")])  # lands mid-read
            return await real_get(keys)

        shard.l2.get_many_with_ttl = slow_get
        late = await shard.lookup([key])
        await shard.flush()
        return late

    late = run(go())
    assert late.owned == [] and list(late.found.values()) == [(b"v", "hit-l1")]


def test_semantic_answers_are_bounded_across_buckets_least_recently_used_first():
    """Callers choose the buckets (top_k, filter, max_tokens): without a bound over all of
    them, varying one would grow the actor until it runs out of memory."""
    q = np.ones(4, dtype=np.float32) / 2.0
    shard = CacheShard(CacheConfig(semantic_max_answers=3))

    def add(namespace: str, bucket: str) -> None:
        assert shard.semantic_add(namespace, bucket, shard.version(namespace), q, bucket.encode())

    def cached(namespace: str, bucket: str) -> bool:
        return shard.semantic_lookup(namespace, bucket, q, 0.9)[1] is not None

    for bucket in ("b1", "b2", "b3"):
        add("ns", bucket)
    assert cached("ns", "b1")  # used: b2 is now the least recently used
    add("ns", "b4")
    assert [cached("ns", b) for b in ("b1", "b2", "b3", "b4")] == [True, False, True, True]
    shard.bump("ns")  # its answers are dropped, and no longer count
    for bucket in ("c1", "c2", "c3"):
        add("other", bucket)
    assert all(cached("other", b) for b in ("c1", "c2", "c3"))


def test_answers_of_a_shard_actor_from_an_older_release_are_understood():
    """Detached shard actors outlive a deploy of new code: their lookups and stats lack
    the fields added since, which take their defaults."""
    old = Lookup(["k"], pending=["k"])
    del old.owners  # pickled as an older release's Lookup is: no such field
    del old.claim
    assert pickle.loads(pickle.dumps(old)).owners == {}
    assert pickle.loads(pickle.dumps(old)).claim is None
    stats = CacheShard(CacheConfig()).stats()
    older = {"hits_l1": 1, "hits_l2": 0, "misses": 1, "joined": 0, "requests": 2}
    stats["kinds"] = {"search": older}  # without the newer counter
    assert aggregate([stats], 1)["kinds"]["search"]["outranked"] == 0
