"""Merging concurrent calls: at once when idle, together when busy, failures to everyone."""

from __future__ import annotations

import asyncio

import pytest
from ray.serve.context import _RequestContext, _serve_request_context

from cache.client import split_lookup
from cache.keys import embedding_key
from cache.shard import CacheShard, Lookup
from mneme.coalesce import Coalescer, fire_and_forget
from mneme.config import CacheConfig


class GatedCall:
    """A downstream whose calls finish only when the test opens the gate; records batches."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [item * 10 for item in items]


def test_a_lone_submission_goes_at_once_and_later_ones_merge():
    async def scenario():
        call = GatedCall()
        merger = Coalescer(call, max_in_flight=1)
        first = merger.submit([1])
        await asyncio.sleep(0)
        assert call.batches == [[1]]  # nothing in flight: no waiting
        rest = [merger.submit([2, 3]), merger.submit([4])]
        await asyncio.sleep(0)
        assert call.batches == [[1]]  # busy: they wait for the call in flight
        call.gate.set()
        assert await first == [10]
        assert await asyncio.gather(*rest) == [[20, 30], [40]]
        assert call.batches == [[1], [2, 3, 4]]
        assert merger.stats()["calls"] == 2 and merger.stats()["submissions"] == 3

    asyncio.run(scenario())


def test_max_items_splits_a_merge_and_in_flight_follows_the_limit():
    async def scenario():
        call = GatedCall()
        merger = Coalescer(call, max_in_flight=2, max_items=3)
        futures = [merger.submit([i, i]) for i in range(4)]
        await asyncio.sleep(0)
        assert len(call.batches) == 2  # two calls may be in flight at once
        call.gate.set()
        assert await asyncio.gather(*futures) == [[i * 10, i * 10] for i in range(4)]
        assert all(len(batch) <= 3 for batch in call.batches)

    asyncio.run(scenario())


def test_a_failure_reaches_every_merged_caller_and_the_next_call_still_runs():
    async def scenario():
        call = GatedCall()
        merger = Coalescer(call)
        first = merger.submit([1])
        await asyncio.sleep(0)
        merged = [merger.submit([2]), merger.submit([3])]
        call.fail = RuntimeError("replica died")
        call.gate.set()
        for future in [first, *merged]:
            with pytest.raises(RuntimeError, match="replica died"):
                await future
        call.fail = None
        assert await merger.submit([5]) == [50]
        assert merger.in_flight == 0

    asyncio.run(scenario())


def test_a_cancelled_waiter_is_dropped_from_the_merge():
    async def scenario():
        call = GatedCall()
        merger = Coalescer(call)
        first = merger.submit([1])
        await asyncio.sleep(0)
        gone, kept = merger.submit([2]), merger.submit([3])
        gone.cancel()  # its caller's deadline passed while it waited
        call.gate.set()
        await first
        assert await kept == [30]
        assert call.batches == [[1], [3]]

    asyncio.run(scenario())


def test_fire_and_forget_swallows_a_failure_quietly():
    async def scenario():
        call = GatedCall()
        call.fail = RuntimeError("cache gone")
        call.gate.set()
        future = Coalescer(call).submit([1])
        fire_and_forget(future)
        await asyncio.sleep(0.01)
        assert future.done()

    asyncio.run(scenario())


def test_split_lookup_gives_a_shared_miss_to_its_first_asker_only():
    merged = Lookup(
        keys=["a", "b", "a", "c", "b"],
        found={"c": (b"v", "hit-l1")},
        owned=["a"],
        pending=["b"],
        owners={"b": 4},  # a background request computes it
        claim=7,
    )
    first, second, third = split_lookup(merged, [2, 2, 1])
    assert first.owners == second.owners == third.owners == {"b": 4}
    assert first.claim == second.claim == third.claim == 7
    assert (first.keys, first.owned, first.pending) == (["a", "b"], ["a"], ["b"])
    assert (second.keys, second.owned, second.pending) == (["a", "c"], [], ["a"])
    assert second.found["c"] == (b"v", "hit-l1")
    assert (third.keys, third.owned, third.pending) == (["b"], [], ["b"])


def test_a_claim_made_for_a_caller_that_gave_up_is_released():
    """A merged lookup claims a miss for the first caller asking for it; if that caller is
    gone when the answer comes, its claim goes to `orphaned`, or the callers who joined
    the miss would wait `single_flight_wait_s` for an owner that never computes it."""

    async def scenario():
        shard = CacheShard(CacheConfig())
        gates = [asyncio.Event(), asyncio.Event()]  # one per merged call, opened in turn
        calls = 0

        async def lookup(requests):
            nonlocal calls
            gate, calls = gates[calls], calls + 1
            await gate.wait()
            return await shard.lookup(requests)

        released: list[str] = []

        def orphaned(part: Lookup) -> None:
            released.extend(part.owned)
            shard.release(part.owned, part.claim)

        merger = Coalescer(lookup, split=split_lookup, max_in_flight=1, orphaned=orphaned)
        key = embedding_key("model", "hello")
        busy = merger.submit([embedding_key("model", "other")])
        owner, joiner = merger.submit([key]), merger.submit([key])  # merged: one call
        gates[0].set()
        await busy
        await asyncio.sleep(0)  # the merged lookup is in flight
        owner.cancel()  # its request is gone (client disconnected)
        gates[1].set()
        joined = await joiner
        full_key = shard.full_key(key)
        assert joined.pending == [full_key] and released == [full_key]
        assert (await shard.lookup([key])).owned == [full_key]  # free to claim, not joined

    asyncio.run(scenario())


def test_a_merged_call_is_no_callers_serve_child_request():
    """Serve cancels a request's child calls with it (its client disconnected), finding them
    by the request context they were made in: a merged call made in its first caller's
    context would fail every other caller's part with it."""

    async def scenario():
        seen = []

        async def call(items: list[int]) -> list[int]:
            seen.append(_serve_request_context.get())
            return items

        merger = Coalescer(call)

        async def request(request_id: str, item: int) -> list[int]:
            _serve_request_context.set(_RequestContext(_internal_request_id=request_id))
            return await merger.submit([item])

        assert await asyncio.gather(request("a", 1), request("b", 2)) == [[1], [2]]
        assert seen and all(c is None or c._internal_request_id == "" for c in seen)

    asyncio.run(scenario())


def test_the_most_urgent_waiting_submission_goes_in_the_next_call():
    """A critical request's texts are not queued behind a background prewarm's."""

    async def scenario():
        call = GatedCall()
        merger = Coalescer(call, max_in_flight=1, max_items=2)
        busy = merger.submit([0], priority=4)
        background = merger.submit([1, 2], priority=4)
        critical = merger.submit([3], priority=0)
        call.gate.set()
        await asyncio.gather(busy, background, critical)
        assert call.batches == [[0], [3], [1, 2]]  # FIFO would have sent [1, 2] before [3]

    asyncio.run(scenario())


class FakeHandleCall:
    """A merged call as a Serve handle makes it (no Ray here): it runs detached from every
    request, so Serve cancels it with none of them; only `cancel()` stops it (recorded)."""

    def __init__(self, items: list[int]) -> None:
        self.items = items
        self.cancelled = False
        self.gate = asyncio.Event()

    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> list[int]:
        await self.gate.wait()
        if self.cancelled:
            raise RuntimeError("cancelled")  # as Serve's RequestCancelledError
        return [item * 10 for item in self.items]

    def cancel(self) -> None:
        self.cancelled = True
        self.gate.set()


def test_a_merged_call_is_cancelled_once_all_its_callers_left_and_not_before():
    async def scenario():
        calls: list[FakeHandleCall] = []
        merger = Coalescer(lambda items: calls.append(FakeHandleCall(items)) or calls[-1])
        first = merger.submit([1])
        await asyncio.sleep(0)
        second, third = merger.submit([2]), merger.submit([3])  # merged into the next call
        first.cancel()  # its client disconnected
        await asyncio.sleep(0)
        assert [call.cancelled for call in calls] == [True]
        await asyncio.sleep(0.01)  # the next call starts once the first has ended
        second.cancel()  # one of two callers left: the other still wants the result
        await asyncio.sleep(0)
        assert [call.items for call in calls] == [[1], [2, 3]]
        assert [call.cancelled for call in calls] == [True, False]
        calls[1].gate.set()
        assert await third == [30]

    asyncio.run(scenario())
