"""The priority scheduler with a controllable clock: order, EDF, aging, expiry, bounds."""

from __future__ import annotations

import asyncio
import time

import pytest

from mneme.errors import DeadlineExceeded, Overloaded
from mneme.priority import Priority, RequestContext
from mneme.scheduler import PriorityScheduler
from tests.clock import Clock


def ctx(priority: Priority, deadline: float | None = None) -> RequestContext:
    return RequestContext(priority=priority, deadline=deadline)


async def settle() -> None:
    for _ in range(10):  # let woken waiters run through wait_for/shield
        await asyncio.sleep(0)


async def drain(scheduler: PriorityScheduler, tasks: dict[str, asyncio.Task]) -> list[str]:
    """Release the held slot repeatedly and record who is dispatched, in order."""
    order: list[str] = []
    await settle()
    for _ in range(len(tasks)):
        scheduler.release(scheduler.leases[0])
        await settle()
        done = [name for name, t in tasks.items() if t.done() and name not in order]
        order += done
    return order


def enqueue(scheduler, name_to_ctx: dict[str, RequestContext]) -> dict[str, asyncio.Task]:
    return {name: asyncio.ensure_future(scheduler.acquire(c)) for name, c in name_to_ctx.items()}


def test_strict_order_by_class():
    async def go():
        scheduler = PriorityScheduler("gen", 1, timer=Clock(100.0))
        await scheduler.acquire(ctx(Priority.NORMAL))  # the one running request
        tasks = enqueue(scheduler, {p.name: ctx(p) for p in reversed(Priority)})
        return await drain(scheduler, tasks)

    assert asyncio.run(go()) == ["CRITICAL", "HIGH", "NORMAL", "LOW", "BACKGROUND"]


def test_fifo_policy_ignores_classes():
    async def go():
        scheduler = PriorityScheduler("gen", 1, fifo=True, timer=Clock(100.0))
        await scheduler.acquire(ctx(Priority.NORMAL))
        tasks = enqueue(scheduler, {p.name: ctx(p) for p in reversed(Priority)})
        return await drain(scheduler, tasks)

    assert asyncio.run(go()) == ["BACKGROUND", "LOW", "NORMAL", "HIGH", "CRITICAL"]


def test_earliest_deadline_first_inside_a_class_fifo_otherwise():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 1, timer=clock)
        await scheduler.acquire(ctx(Priority.HIGH))
        far = clock.now + 1000
        tasks = enqueue(
            scheduler,
            {
                "none-1": ctx(Priority.HIGH),
                "d30": ctx(Priority.HIGH, far + 30),
                "d10": ctx(Priority.HIGH, far + 10),
                "none-2": ctx(Priority.HIGH),
                "d20": ctx(Priority.HIGH, far + 20),
            },
        )
        return await drain(scheduler, tasks)

    assert asyncio.run(go()) == ["d10", "d20", "d30", "none-1", "none-2"]


def test_aging_moves_a_starving_request_up():
    async def go(waited_s: float):
        clock = Clock(100.0)
        scheduler = PriorityScheduler(
            "gen", 1, starvation_threshold_s=5.0, boost_interval_s=1.0, timer=clock
        )
        await scheduler.acquire(ctx(Priority.NORMAL))
        tasks = enqueue(scheduler, {"background": ctx(Priority.BACKGROUND)})
        await settle()
        clock.now += waited_s
        tasks |= enqueue(scheduler, {"normal": ctx(Priority.NORMAL)})
        order = await drain(scheduler, tasks)
        return order, scheduler.stats()["classes"]["background"]["boosted"]

    # 4 s: not yet starving, normal goes first
    assert asyncio.run(go(4.0)) == (["normal", "background"], 0)
    # 7 s: boosted at 5 s (low), 6 s (normal), 7 s (high): it beats a fresh normal
    assert asyncio.run(go(7.0)) == (["background", "normal"], 1)


def test_expired_deadline_is_refused_and_never_dispatched():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 1, timer=clock)
        with pytest.raises(DeadlineExceeded):
            await scheduler.acquire(ctx(Priority.CRITICAL, clock.now - 1))
        await scheduler.acquire(ctx(Priority.NORMAL))
        waiting = asyncio.ensure_future(scheduler.acquire(ctx(Priority.NORMAL, clock.now + 60)))
        await settle()
        clock.now += 61  # its deadline passes while it waits for the slot
        scheduler.release(scheduler.leases[0])
        with pytest.raises(DeadlineExceeded):
            await waiting
        return scheduler.stats()

    stats = asyncio.run(go())
    assert stats["classes"]["normal"]["expired"] == 1 and stats["in_flight"] == 0
    assert stats["classes"]["critical"]["expired"] == 1


def test_a_real_timeout_expires_a_waiter():
    async def go():
        import time

        scheduler = PriorityScheduler("gen", 1)
        await scheduler.acquire(ctx(Priority.NORMAL))
        with pytest.raises(DeadlineExceeded):
            await scheduler.acquire(ctx(Priority.NORMAL, time.monotonic() + 0.05))
        return scheduler.queued()

    assert asyncio.run(go()) == 0


def test_queues_are_bounded_per_class():
    async def go():
        scheduler = PriorityScheduler("gen", 1, max_queued_per_class=2, timer=Clock(100.0))
        await scheduler.acquire(ctx(Priority.NORMAL))
        enqueue(scheduler, {"a": ctx(Priority.LOW), "b": ctx(Priority.LOW)})
        await settle()
        with pytest.raises(Overloaded) as err:
            await scheduler.acquire(ctx(Priority.LOW))
        other_class = asyncio.ensure_future(scheduler.acquire(ctx(Priority.HIGH)))
        await settle()
        return err.value, scheduler.queued(), other_class.done()

    error, queued, _ = asyncio.run(go())
    assert error.status_code == 503 and error.retry_after_s >= 1
    assert queued == 3  # the high request queued despite the full low queue


def test_cancelled_waiters_leave_the_queue_and_leak_no_slot():
    async def go():
        scheduler = PriorityScheduler("gen", 1, timer=Clock(100.0))
        await scheduler.acquire(ctx(Priority.NORMAL))
        doomed = asyncio.ensure_future(scheduler.acquire(ctx(Priority.CRITICAL)))
        survivor = asyncio.ensure_future(scheduler.acquire(ctx(Priority.LOW)))
        await settle()
        doomed.cancel()
        await settle()
        queued_after_cancel = scheduler.queued()
        scheduler.release(scheduler.leases[0])
        await survivor
        return queued_after_cancel, scheduler.in_flight, scheduler.stats()

    queued, in_flight, stats = asyncio.run(go())
    assert queued == 1 and in_flight == 1
    assert stats["classes"]["critical"]["cancelled"] == 1


def test_more_capacity_dispatches_waiters():
    async def go():
        scheduler = PriorityScheduler("gen", 1, timer=Clock(100.0))
        await scheduler.acquire(ctx(Priority.NORMAL))
        tasks = enqueue(scheduler, {str(i): ctx(Priority.NORMAL) for i in range(3)})
        await settle()
        scheduler.set_capacity(4)
        await settle()
        return all(t.done() for t in tasks.values()), scheduler.in_flight

    assert asyncio.run(go()) == (True, 4)


def test_admission_by_expected_wait():
    """Once service times are known, a request expected to wait too long is refused now."""

    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 2, max_queue_wait_s=3.0, timer=clock)
        async with scheduler.slot(ctx(Priority.NORMAL)):
            clock.now += 1.0  # one request held its slot 1 s: the service-time estimate
        await scheduler.acquire(ctx(Priority.NORMAL))
        await scheduler.acquire(ctx(Priority.NORMAL))  # budget full
        queued = enqueue(scheduler, {str(i): ctx(Priority.NORMAL) for i in range(5)})
        await settle()  # 5 queued over 2 slots at 1 s each: ~3.5 s for the next one
        with pytest.raises(Overloaded) as err:
            await scheduler.acquire(ctx(Priority.NORMAL))
        with pytest.raises(Overloaded):  # recent dispatches were all normal: none left for it
            await scheduler.acquire(ctx(Priority.BACKGROUND))
        critical = asyncio.ensure_future(scheduler.acquire(ctx(Priority.CRITICAL)))
        await settle()
        for task in [*queued.values(), critical]:
            task.cancel()
        return err.value, scheduler.stats()["classes"]

    error, classes = asyncio.run(go())
    assert "saturated" in error.message and error.retry_after_s >= 1
    assert classes["normal"]["rejected"] == 1 and classes["background"]["rejected"] == 1
    assert classes["critical"]["rejected"] == 0  # nothing of its class is ahead of it


def test_a_reserved_slot_is_kept_for_critical_and_high():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 4, reserved_share=0.25, timer=clock)
        assert scheduler.reserved == 1
        for _ in range(3):
            await scheduler.acquire(ctx(Priority.BACKGROUND))
        # a slot is free, but only for critical and high: background and normal wait
        late = enqueue(scheduler, {"bg": ctx(Priority.BACKGROUND), "normal": ctx(Priority.NORMAL)})
        await settle()
        assert not any(t.done() for t in late.values()) and scheduler.in_flight == 3
        urgent = asyncio.ensure_future(scheduler.acquire(ctx(Priority.CRITICAL)))
        await settle()
        assert urgent.done() and scheduler.in_flight == 4
        # the critical one ends: the reserve is free again, still not theirs
        scheduler.release(urgent.result())
        await settle()
        assert not any(t.done() for t in late.values())
        # a background one ends: the best waiter (normal) takes its slot
        scheduler.release(scheduler.leases[0])
        await settle()
        assert late["normal"].done() and not late["bg"].done()
        # aged to normal (threshold + 1 boost) it still may not take the reserve ...
        clock.now += 5.0 + 1.0
        scheduler._dispatch()
        await settle()
        assert not late["bg"].done()
        clock.now += 1.0  # ... aged to high (threshold + 2 boosts), it may
        scheduler._dispatch()
        await settle()
        assert late["bg"].done() and scheduler.in_flight == 4
        return scheduler.stats()

    stats = asyncio.run(go())
    assert stats["reserved"] == 1 and stats["classes"]["background"]["boosted"] == 1


def test_small_budgets_reserve_nothing_and_fifo_never_reserves():
    assert PriorityScheduler("gen", 3, reserved_share=0.25).reserved == 0
    assert PriorityScheduler("gen", 64, reserved_share=0.25).reserved == 16
    assert PriorityScheduler("gen", 64, reserved_share=0.25, fifo=True).reserved == 0


def test_queue_waits_are_recorded_on_the_request():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 1, timer=clock)
        first, second = ctx(Priority.NORMAL), ctx(Priority.NORMAL)
        await scheduler.acquire(first)
        task = asyncio.ensure_future(scheduler.acquire(second))
        await settle()
        clock.now += 0.25
        scheduler.release(scheduler.leases[0])
        await settle()
        await task
        return first.queue_waits, second.queue_waits

    assert asyncio.run(go()) == ([0.0], [0.25])


def test_a_request_never_waits_past_the_queue_wait_bound():
    async def go():
        scheduler = PriorityScheduler("gen", 1, max_queue_wait_s=0.05)
        await scheduler.acquire(ctx(Priority.NORMAL))  # holds the only slot
        with pytest.raises(Overloaded) as err:
            await scheduler.acquire(ctx(Priority.BACKGROUND))
        # a deadline sooner than the bound is still a 504
        with pytest.raises(DeadlineExceeded):
            await scheduler.acquire(ctx(Priority.LOW, deadline=time.monotonic() + 0.01))
        return err.value, scheduler.stats()

    error, stats = asyncio.run(go())
    assert error.status_code == 503 and error.code == "queue_timeout" and error.retry_after_s >= 1
    assert stats["waiting"] == 0 and stats["in_flight"] == 1
    assert stats["classes"]["background"]["timed_out"] == 1
    assert stats["classes"]["low"]["expired"] == 1


def test_a_wait_that_ends_without_a_slot_is_recorded_too():
    """Under overload the requests refused after queueing waited longest: their waits are
    in the percentiles and on their responses (X-Queue-Wait-Ms), not only the served ones'."""

    async def go():
        scheduler = PriorityScheduler("gen", 1, max_queue_wait_s=0.05)
        await scheduler.acquire(ctx(Priority.NORMAL))  # holds the only slot
        refused = ctx(Priority.BACKGROUND)
        with pytest.raises(Overloaded):
            await scheduler.acquire(refused)
        expired = ctx(Priority.LOW, deadline=time.monotonic() + 0.02)
        with pytest.raises(DeadlineExceeded):
            await scheduler.acquire(expired)
        gone = ctx(Priority.HIGH)
        leaving = asyncio.ensure_future(scheduler.acquire(gone))
        await asyncio.sleep(0.01)
        leaving.cancel()  # its client disconnected
        await asyncio.gather(leaving, return_exceptions=True)
        return [r.queue_waits for r in (refused, expired, gone)], scheduler.stats()["classes"]

    waits, classes = asyncio.run(go())
    assert 0.04 < waits[0][0] < 1.0 and 0.01 < waits[1][0] < 1.0 and 0.005 < waits[2][0] < 1.0
    for cls in ("background", "low", "high"):
        assert classes[cls]["queue_wait"]["count"] == 1 and classes[cls]["dispatched"] == 0


async def one_reserved_slot_left(
    threshold_s: float, boost_s: float, holders: Priority
) -> PriorityScheduler:
    """Four slots, one reserved for critical and high; the other three held (real time)."""
    scheduler = PriorityScheduler(
        "gen",
        4,
        reserved_share=0.25,
        starvation_threshold_s=threshold_s,
        boost_interval_s=boost_s,
        max_queue_wait_s=10.0,
    )
    for _ in range(3):
        await scheduler.acquire(ctx(holders))
    return scheduler


def test_aging_alone_dispatches_into_a_reserved_slot():
    """No release or arrival after it queues: the scheduler looks again when it ages up."""

    async def go():
        scheduler = await one_reserved_slot_left(0.05, 0.02, Priority.BACKGROUND)
        started = time.monotonic()
        await asyncio.wait_for(scheduler.acquire(ctx(Priority.BACKGROUND)), 1.0)
        return time.monotonic() - started, scheduler.in_flight

    waited, in_flight = asyncio.run(go())
    assert 0.09 <= waited < 0.5 and in_flight == 4  # high after threshold + 2 boosts = 0.09 s


def test_a_cancelled_waiter_that_had_expired_releases_nothing():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 1, timer=clock)
        await scheduler.acquire(ctx(Priority.NORMAL))
        waiter = asyncio.ensure_future(
            scheduler.acquire(ctx(Priority.NORMAL, deadline=clock.now + 5.0))
        )
        await settle()
        clock.now += 10.0  # its deadline has passed by the scheduler's clock
        scheduler.release(scheduler.leases[0])  # _dispatch expires the waiter ...
        waiter.cancel()  # ... and its client goes away in the same tick
        with pytest.raises((asyncio.CancelledError, DeadlineExceeded)):
            await waiter
        return scheduler.in_flight

    assert asyncio.run(go()) == 0


def test_a_critical_request_preempts_the_newest_background_call():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 2, preempt=True, timer=clock)
        older = await scheduler.acquire(ctx(Priority.BACKGROUND), preemptible=True)
        clock.now += 1.0
        newer = await scheduler.acquire(ctx(Priority.BACKGROUND), preemptible=True)
        later_bg = asyncio.ensure_future(scheduler.acquire(ctx(Priority.BACKGROUND)))
        critical = asyncio.ensure_future(scheduler.acquire(ctx(Priority.CRITICAL)))
        await settle()
        assert newer.preempted.done() and not older.preempted.done()
        assert not critical.done()  # the slot is its once the preempted call lets go
        scheduler.release(newer)
        await settle()
        assert critical.done() and not later_bg.done()
        # the preempted call queues again ahead of the background request that came later
        resumed = asyncio.ensure_future(
            scheduler.acquire(newer.ctx, preemptible=True, resume=newer)
        )
        await settle()
        scheduler.release(critical.result())
        await settle()
        assert resumed.done() and not later_bg.done()
        again = resumed.result()
        assert again.preempted is None  # never preempted twice
        assert again.queue_wait_s == newer.queue_wait_s  # it waited no time before the retry
        return scheduler.stats()["classes"]["background"]

    stats = asyncio.run(go())
    assert stats["preempted"] == 1 and stats["dispatched"] == 3


def test_preemption_spares_streams_aged_requests_and_normal_work():
    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 3, preempt=True, timer=clock)
        stream = await scheduler.acquire(ctx(Priority.BACKGROUND))  # not preemptible
        normal = await scheduler.acquire(ctx(Priority.NORMAL), preemptible=True)
        # a background request that waited long enough to run as normal (threshold + 1
        # boost) is not sent back
        blocker = await scheduler.acquire(ctx(Priority.NORMAL))
        aged = asyncio.ensure_future(scheduler.acquire(ctx(Priority.BACKGROUND), preemptible=True))
        await settle()
        clock.now += 6.5
        scheduler.release(blocker)
        await settle()
        boosted = aged.result()
        critical = asyncio.ensure_future(scheduler.acquire(ctx(Priority.CRITICAL)))
        await settle()
        leases = (stream, normal, boosted)
        return critical.done(), [
            lease.preempted is not None and lease.preempted.done() for lease in leases
        ]

    assert asyncio.run(go()) == (False, [False, False, False])


def test_fifo_never_preempts():
    async def go():
        scheduler = PriorityScheduler("gen", 1, preempt=True, fifo=True, timer=Clock(100.0))
        bg = await scheduler.acquire(ctx(Priority.BACKGROUND), preemptible=True)
        asyncio.ensure_future(scheduler.acquire(ctx(Priority.CRITICAL)))
        await settle()
        return bg.preempted

    assert asyncio.run(go()) is None


def test_a_preempted_slot_body_sees_preempted_and_the_slot_passes_on():
    from mneme.scheduler import Preempted

    async def go():
        scheduler = PriorityScheduler("gen", 1, preempt=True, timer=Clock(100.0))
        started = asyncio.Event()
        never = asyncio.get_running_loop().create_future()

        async def background():
            async with scheduler.slot(ctx(Priority.BACKGROUND), preemptible=True) as lease:
                started.set()
                await lease.watch(never)

        bg = asyncio.ensure_future(background())
        await started.wait()
        async with scheduler.slot(ctx(Priority.CRITICAL)):
            held = scheduler.in_flight
        with pytest.raises(Preempted):
            await bg
        return held, never.cancelled(), scheduler.in_flight

    assert asyncio.run(go()) == (1, True, 0)


def test_a_critical_request_with_a_deadline_is_admitted_when_it_would_preempt():
    """Every slot is held, but by background calls it may take at once: its deadline is no
    reason to refuse it, whatever the mean hold time."""

    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler("gen", 2, preempt=True, timer=clock)
        async with scheduler.slot(ctx(Priority.NORMAL)):
            clock.now += 1.0  # holds last 1 s: a full queue would mean ~1 s
        background = [
            await scheduler.acquire(ctx(Priority.BACKGROUND), preemptible=True) for _ in range(2)
        ]
        critical = asyncio.ensure_future(
            scheduler.acquire(ctx(Priority.CRITICAL, deadline=clock.now + 0.5))
        )
        await settle()
        assert background[1].preempted.done()  # not refused: it preempted
        scheduler.release(background[1])
        await settle()
        return critical.done() and not critical.exception()

    assert asyncio.run(go())


def test_the_scheduler_looks_again_when_the_first_waiter_ages_up_not_the_best_one():
    """Two normal waiters for a reserved slot: the best now is the later one with a
    deadline, but the older one reaches high (and the slot) first."""

    async def go():
        scheduler = await one_reserved_slot_left(0.3, 5.0, Priority.NORMAL)
        older = asyncio.ensure_future(scheduler.acquire(ctx(Priority.NORMAL)))
        await asyncio.sleep(0.2)
        later = asyncio.ensure_future(
            scheduler.acquire(ctx(Priority.NORMAL, deadline=time.monotonic() + 60))
        )
        await asyncio.sleep(0.25)  # the older one aged to high at 0.3 s; the later at 0.5 s
        outcome = older.done(), later.done()
        later.cancel()
        return outcome

    assert asyncio.run(go()) == (True, False)


def test_a_low_request_that_aging_would_serve_in_time_is_admitted_not_refused():
    """Normal traffic takes every slot, so a low request's share-based estimate is large;
    but aging lifts it past normal (to high) within the bound, and then only the requests
    that queued before it go first. It must be queued, not refused at once, and served
    before the normal requests that arrived after it."""

    async def go():
        clock = Clock(100.0)
        scheduler = PriorityScheduler(
            "gen", 4, starvation_threshold_s=0.5, boost_interval_s=0.1, timer=clock
        )  # the bound: 0.5 + 2 x 0.1 = 0.7 s
        async with scheduler.slot(ctx(Priority.NORMAL)):
            clock.now += 0.2  # a slot is held 0.2 s: the service-time estimate
        for _ in range(4):
            await scheduler.acquire(ctx(Priority.NORMAL))  # budget full, all normal
        tasks = enqueue(scheduler, {f"before{i}": ctx(Priority.NORMAL) for i in range(3)})
        await settle()
        tasks["low"] = asyncio.ensure_future(scheduler.acquire(ctx(Priority.LOW)))
        await settle()
        refused = tasks["low"].done()  # refused before: ~3.5 s by the normal share alone
        clock.now += 0.3
        tasks |= enqueue(scheduler, {f"after{i}": ctx(Priority.NORMAL) for i in range(3)})
        clock.now += 0.35  # low has waited 0.65 s: high; `after*` are still normal
        return refused, await drain(scheduler, tasks)

    refused, order = asyncio.run(go())
    assert not refused
    assert order == ["before0", "before1", "before2", "low", "after0", "after1", "after2"]
