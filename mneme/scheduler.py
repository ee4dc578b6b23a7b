"""Priority scheduling in front of one downstream: classes, aging, deadlines, admission.

Ray Serve has no request priority; the Router holds requests here and releases them to a
downstream only while it has capacity (a concurrency budget). Order: strict by class, earliest
deadline first inside a class, FIFO otherwise. A request waiting longer than the starvation
threshold moves up one class, and again every boost interval, so background work is never
starved forever. Queues are bounded per class. With preemption, a critical or high request
that finds every slot taken cancels the most recently started low or background call that was
marked preemptible; that call goes back to the head of its queue with the age it had (each at
most once). Pure asyncio with an injectable clock.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from mneme.errors import DeadlineExceeded, Overloaded
from mneme.priority import Priority, RequestContext
from mneme.stats import LatencyWindow


@dataclass
class Waiter:
    ctx: RequestContext
    seq: int
    enqueued_at: float  # first arrival: aging and FIFO order count from here
    future: asyncio.Future = field(repr=False)  # -> its Lease
    queued_at: float = 0.0  # this time in the queue (later than enqueued_at once preempted)
    waited_before_s: float = 0.0  # queued before an earlier dispatch that was preempted
    preemptible: bool = False

    def effective_class(self, now: float, threshold_s: float, boost_s: float) -> int:
        waited = now - self.enqueued_at
        if waited < threshold_s:
            return int(self.ctx.priority)
        boosts = 1 + int((waited - threshold_s) // boost_s)
        return max(0, int(self.ctx.priority) - boosts)

    def until_next_boost(self, now: float, threshold_s: float, boost_s: float) -> float:
        """Seconds until `effective_class` next moves up."""
        waited = now - self.enqueued_at
        if waited < threshold_s:
            return threshold_s - waited
        return boost_s - (waited - threshold_s) % boost_s

    def order(self, now: float, threshold_s: float, boost_s: float) -> tuple:
        deadline = self.ctx.deadline if self.ctx.deadline is not None else math.inf
        return (self.effective_class(now, threshold_s, boost_s), deadline, self.seq)


class Preempted(Exception):
    """Raised in a preemptible slot's body when a critical or high request took its slot; the
    caller cancels what it started and asks again with `slot(ctx, resume=lease)`."""


@dataclass(eq=False)
class Lease:
    """A slot held: who holds it, since when, and whether a more urgent request may take it."""

    ctx: RequestContext
    seq: int
    enqueued_at: float
    queue_wait_s: float  # waited before this dispatch (and before any earlier one)
    dispatched_class: int  # effective class at dispatch
    # set when a more urgent request takes the slot; None: not preemptible
    preempted: asyncio.Future | None = field(default=None, repr=False)

    @classmethod
    def unscheduled(cls, ctx: RequestContext) -> Lease:
        """What a call holds when no scheduler stands in front of its downstream."""
        return cls(ctx, -1, 0.0, 0.0, int(ctx.priority))

    @property
    def giving_back(self) -> bool:
        """Preempted, and not yet released."""
        return self.preempted is not None and self.preempted.done()

    async def watch(self, awaitable, timeout_s: float | None = None):
        """Awaits `awaitable` (up to `timeout_s`); raises Preempted if the slot is taken."""
        if self.preempted is None:
            return await asyncio.wait_for(awaitable, timeout_s)
        work = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait(
                {work, self.preempted}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            work.cancel()
            raise
        if work in done:
            return work.result()
        work.cancel()
        if self.preempted in done:
            raise Preempted
        raise TimeoutError


@dataclass
class ClassStats:
    queued: int = 0
    dispatched: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    timed_out: int = 0  # waited max_queue_wait_s without a slot: 503
    boosted: int = 0
    preempted: int = 0  # gave its slot to a critical or high request and queued again
    queue_wait: LatencyWindow = field(default_factory=LatencyWindow)

    def as_dict(self) -> dict:
        return {
            "queued": self.queued,
            "dispatched": self.dispatched,
            "rejected": self.rejected,
            "expired": self.expired,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "boosted": self.boosted,
            "preempted": self.preempted,
            "queue_wait": self.queue_wait.summary(),
        }


class PriorityScheduler:
    """`async with scheduler.slot(ctx):` runs the body once the downstream has room."""

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        max_queued_per_class: int = 256,
        starvation_threshold_s: float = 5.0,
        boost_interval_s: float = 1.0,
        max_queue_wait_s: float | None = None,
        fifo: bool = False,
        reserved_share: float = 0.0,
        preempt: bool = False,
        timer: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.capacity = max(1, capacity)
        self.max_queued_per_class = max_queued_per_class
        self.starvation_threshold_s = starvation_threshold_s
        self.boost_interval_s = boost_interval_s
        # The longest a request waits for a slot: one expected to wait longer is refused at
        # once, and one still waiting when it is reached gets 503 then (both with Retry-After),
        # so a queue never hangs. Default: starvation threshold + 2 boosts (by then aging has
        # made a background request high).
        self.max_queue_wait_s = (
            max_queue_wait_s
            if max_queue_wait_s is not None
            else starvation_threshold_s + 2 * boost_interval_s
        )
        self.fifo = fifo
        self.reserved_share = 0.0 if fifo else reserved_share
        self.preempt = preempt and not fifo
        self.timer = timer
        self.leases: list[Lease] = []  # the slots held, oldest first
        self._waiting: list[Waiter] = []
        self._seq = itertools.count()
        self._stats: dict[Priority, ClassStats] = defaultdict(ClassStats)
        self._service_s = 0.0  # EWMA of time a dispatched request holds its slot
        self.max_waiting_seen = 0
        self._wake: asyncio.TimerHandle | None = None  # re-dispatch when a waiter ages up
        self._recent_classes: deque[tuple[float, int]] = deque(maxlen=200)  # (when, class)

    @property
    def in_flight(self) -> int:
        return len(self.leases)

    # -------------------------------------------------------------- capacity
    def set_capacity(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._dispatch()

    @property
    def reserved(self) -> int:
        """Slots only critical and high requests (or ones aged up to high) may take, so a
        live request never waits for background work to finish: floor(capacity x share)."""
        return int(self.capacity * self.reserved_share)

    def limit(self, effective_class: int) -> int:
        """How many slots may be in flight when a request of this class is dispatched."""
        if effective_class <= Priority.HIGH:
            return self.capacity
        return self.capacity - self.reserved

    def may_start(self, effective_class: int) -> bool:
        return self.in_flight < self.limit(effective_class)

    def _urgent_waiting(self) -> int:
        return sum(1 for w in self._waiting if w.ctx.priority <= Priority.HIGH)

    def queued(self, priority: Priority | None = None) -> int:
        if priority is None:
            return len(self._waiting)
        return sum(1 for w in self._waiting if w.ctx.priority == priority)

    # ------------------------------------------------------------- admission
    def _admit(self, ctx: RequestContext) -> None:
        stats = self._stats[ctx.priority]
        now = self.timer()
        if ctx.deadline is not None and ctx.deadline <= now:
            stats.expired += 1
            raise DeadlineExceeded(f"deadline passed before {self.name} could start it")
        if self.queued(ctx.priority) >= self.max_queued_per_class:
            stats.rejected += 1
            raise Overloaded(
                f"{self.name} queue for {ctx.priority.name.lower()} is full",
                retry_after_s=self._retry_after_s(),
            )
        if self._service_s > 0 and self.in_flight >= self.limit(ctx.priority):
            if self._will_preempt_for(ctx.priority):
                return  # it takes a background call's slot at once
            expected, ahead = self._expected_wait_s(ctx.priority)
            if expected > self.max_queue_wait_s:
                stats.rejected += 1
                raise Overloaded(
                    f"{self.name} is saturated: ~{expected:.1f} s of "
                    f"{ctx.priority.name.lower()} work queued ahead",
                    retry_after_s=self._retry_after_s(),
                )
            if ctx.deadline is not None and now + expected > ctx.deadline:
                stats.rejected += 1
                raise Overloaded(
                    f"{self.name} cannot start this before its deadline "
                    f"({ahead} queued ahead, ~{expected * 1000:.0f} ms)",
                    retry_after_s=self._retry_after_s(),
                )

    def _will_preempt_for(self, priority: Priority) -> bool:
        """A critical or high request would take a preemptible call's slot at once: one is
        left over after the urgent requests already queued have taken theirs."""
        if not self.preempt or priority > Priority.HIGH:
            return False
        return len(self._victims()) > self._urgent_waiting()

    def _victims(self) -> list[Lease]:
        """Preemptible calls that ran as low or background, newest first."""
        return [
            lease
            for lease in reversed(self.leases)
            if lease.preempted is not None
            and not lease.giving_back
            and lease.dispatched_class >= Priority.LOW
        ]

    def _expected_wait_s(self, priority: Priority) -> tuple[float, int]:
        """Queued work at or above `priority`, drained at the share of the budget that higher
        classes (by recent dispatches) leave to it."""
        ahead = sum(1 for w in self._waiting if w.ctx.priority <= priority)
        horizon = self.timer() - self.starvation_threshold_s  # only the current traffic mix
        recent = [c for t, c in self._recent_classes if t >= horizon]
        higher = sum(1 for c in recent if c < priority) / len(recent) if recent else 0.0
        left = max(0.1, 1.0 - higher)
        usable = max(1, self.limit(priority))
        expected = (ahead / usable + 1) * self._service_s / left
        return min(expected, self._aged_wait_s(priority, recent, ahead)), ahead

    def _aged_wait_s(self, priority: Priority, recent: list[int], ahead: int) -> float:
        """The wait at most, by aging: once the request has aged past the most urgent class
        recently dispatched, only the `ahead` requests that queued before it (aged as much or
        more) still go first, at the full rate of the slots that class may use; later
        arrivals of the classes taking the slots cannot keep it waiting past then. Unbounded
        for FIFO (no classes) and for a class no more urgent one takes slots from."""
        top = min(recent, default=int(priority))
        if self.fifo or top >= priority:
            return math.inf
        past_top = max(0, top - 1)  # effective class past `top` (critical: level with it)
        boosts = int(priority) - past_top
        aged = self.starvation_threshold_s + (boosts - 1) * self.boost_interval_s
        usable = max(1, self.limit(past_top))
        return max(aged, ahead / usable * self._service_s) + self._service_s / usable

    def _retry_after_s(self) -> float:
        backlog = len(self._waiting) / self.capacity * max(self._service_s, 0.05)
        return max(1.0, backlog)

    # ----------------------------------------------------------- the queue
    @asynccontextmanager
    async def slot(
        self, ctx: RequestContext, *, preemptible: bool = False, resume: Lease | None = None
    ) -> AsyncIterator[Lease]:
        """Holds a slot for the body. `preemptible`: a critical or high request may take it
        (the body sees Preempted through `lease.watch`); `resume`: the lease a preempted call
        held, so it queues again at the place and age it had."""
        lease = await self.acquire(ctx, preemptible=preemptible, resume=resume)
        started = self.timer()
        try:
            yield lease
        finally:
            if not lease.giving_back:
                held = self.timer() - started
                self._service_s = (
                    held if self._service_s == 0 else 0.9 * self._service_s + 0.1 * held
                )
            self.release(lease)

    async def acquire(
        self, ctx: RequestContext, *, preemptible: bool = False, resume: Lease | None = None
    ) -> Lease:
        stats = self._stats[ctx.priority]
        now = self.timer()
        if resume is None:
            self._admit(ctx)
        elif ctx.deadline is not None and ctx.deadline <= now:
            stats.expired += 1
            raise DeadlineExceeded(f"deadline passed before {self.name} could start it again")
        future = asyncio.get_running_loop().create_future()
        if resume is None:
            waiter = Waiter(ctx, next(self._seq), now, future, now, 0.0, preemptible)
            if not self._waiting and self.may_start(int(ctx.priority)):
                return self._grant(waiter, int(ctx.priority), now)
        else:  # preempted: back at its old place, with its age; never preempted twice
            waiter = Waiter(ctx, resume.seq, resume.enqueued_at, future, now, resume.queue_wait_s)
        self._waiting.append(waiter)
        self.max_waiting_seen = max(self.max_waiting_seen, len(self._waiting))
        stats.queued += 1
        self._dispatch()  # waiters of lower classes may leave a reserved slot to this one
        # Wait for a slot until the deadline or the queue-wait bound, whichever comes first.
        bound_s = max(0.0, self.max_queue_wait_s - waiter.waited_before_s)
        remaining = None if ctx.deadline is None else max(0.0, ctx.deadline - now)
        bounded = remaining is None or bound_s < remaining
        try:
            return await asyncio.wait_for(
                asyncio.shield(waiter.future), bound_s if bounded else remaining
            )
        except TimeoutError:
            self._dispatch()  # aged up at this very moment, it may just now get a slot
            if _holds_slot(waiter):
                return waiter.future.result()  # dispatched in the instant the wait ended
            if waiter.future.done() and not waiter.future.cancelled():
                raise waiter.future.exception() from None  # expired by that dispatch: counted
            self._record_wait(waiter)
            self._forget(waiter)
            if not bounded:
                stats.expired += 1
                raise DeadlineExceeded(f"deadline passed while queued for {self.name}") from None
            stats.timed_out += 1
            raise Overloaded(
                f"waited {self.max_queue_wait_s:.1f} s for {self.name} without a slot",
                retry_after_s=self._retry_after_s(),
                code="queue_timeout",
            ) from None
        except asyncio.CancelledError:  # the client went away: its work is never started
            if _holds_slot(waiter):
                self.release(waiter.future.result())  # just dispatched: hand the slot on
            else:
                self._record_wait(waiter)
                self._forget(waiter)
            stats.cancelled += 1
            raise
        finally:
            stats.queued -= 1

    def _record_wait(self, waiter: Waiter, now: float | None = None) -> float:
        """A wait that ended, with a slot or without one (timed out, expired, its client
        gone): it counts in the percentiles and in its response's X-Queue-Wait-Ms."""
        waited = (self.timer() if now is None else now) - waiter.queued_at
        self._stats[waiter.ctx.priority].queue_wait.observe(waited)
        waiter.ctx.queue_waits.append(waited)
        return waited

    def _forget(self, waiter: Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()

    def _grant(self, waiter: Waiter, effective: int, now: float) -> Lease:
        """`waiter` takes a slot now, running as class `effective`."""
        stats = self._stats[waiter.ctx.priority]
        if effective < waiter.ctx.priority:
            stats.boosted += 1
        stats.dispatched += 1
        self._recent_classes.append((now, int(waiter.ctx.priority)))
        waited = self._record_wait(waiter, now)
        preempted = None
        if waiter.preemptible and self.preempt:
            preempted = asyncio.get_running_loop().create_future()
        lease = Lease(
            waiter.ctx,
            waiter.seq,
            waiter.enqueued_at,
            waiter.waited_before_s + waited,
            effective,
            preempted,
        )
        self.leases.append(lease)
        return lease

    def release(self, lease: Lease) -> None:
        self.leases.remove(lease)
        self._dispatch()

    def _preempt(self) -> None:
        """Each critical or high request still queued (every slot is taken, or it would have
        been dispatched) takes the slot of the most recently started preemptible low or
        background call (one that ran as low or background, not aged past that). The
        preempted call queues again (`resume`)."""
        urgent = self._urgent_waiting()
        if not urgent:
            return
        freeing = sum(1 for lease in self.leases if lease.giving_back)  # not yet released
        for lease in self._victims()[: max(0, urgent - freeing)]:
            lease.preempted.set_result(None)
            self._stats[lease.ctx.priority].preempted += 1

    def _dispatch(self) -> None:
        now = self.timer()
        while self.in_flight < self.capacity and self._waiting:
            waiter = self._pick(now)
            effective = waiter.effective_class(
                now, self.starvation_threshold_s, self.boost_interval_s
            )
            if not self.may_start(effective):
                # the best waiter may not take a reserved slot, nor may any after it; look
                # again when aging next moves one of them up a class
                self._wake_at_next_boost(now)
                break
            self._waiting.remove(waiter)
            stats = self._stats[waiter.ctx.priority]
            if waiter.ctx.deadline is not None and waiter.ctx.deadline <= now:
                self._record_wait(waiter, now)
                waiter.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued for {self.name}")
                )
                stats.expired += 1
                continue
            waiter.future.set_result(self._grant(waiter, effective, now))
        if self.preempt:
            self._preempt()

    def _wake_at_next_boost(self, now: float) -> None:
        """At the next boost of any waiter still below high: the first to reach high may
        be an older one, not the best now (an earlier deadline in the same class)."""
        aging = (self.starvation_threshold_s, self.boost_interval_s)
        delays = [
            w.until_next_boost(now, *aging)
            for w in self._waiting
            if w.effective_class(now, *aging) > Priority.HIGH
        ]
        if not delays:
            return
        delay = min(delays)
        if self._wake is not None:
            self._wake.cancel()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a synchronous caller): the next event will look
            return
        self._wake = loop.call_later(delay + 1e-3, self._dispatch)

    def _pick(self, now: float) -> Waiter:
        if self.fifo:
            return min(self._waiting, key=lambda w: w.seq)
        return min(
            self._waiting,
            key=lambda w: w.order(now, self.starvation_threshold_s, self.boost_interval_s),
        )

    # ---------------------------------------------------------------- stats
    def stats(self) -> dict:
        return {
            "capacity": self.capacity,
            "reserved": self.reserved,
            "in_flight": self.in_flight,
            "waiting": len(self._waiting),
            "max_waiting_seen": self.max_waiting_seen,
            "mean_service_ms": self._service_s * 1000.0,
            "policy": "fifo" if self.fifo else "priority",
            "classes": {p.name.lower(): s.as_dict() for p, s in sorted(self._stats.items())},
        }


def _holds_slot(waiter: Waiter) -> bool:
    """Dispatched (an expired or cancelled waiter holds none)."""
    return (
        waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None
    )
