"""Priority scheduling in front of one downstream: classes, aging, deadlines, admission.

Ray Serve has no request priority; the Router holds requests here and releases them to a
downstream only while it has capacity (a concurrency budget). Order: strict by class, earliest
deadline first inside a class, FIFO otherwise. A request waiting longer than the starvation
threshold moves up one class, and again every boost interval, so background work is never
starved forever. Queues are bounded per class. Pure asyncio with an injectable clock.
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
    enqueued_at: float
    future: asyncio.Future = field(repr=False)

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


@dataclass
class ClassStats:
    queued: int = 0
    dispatched: int = 0
    rejected: int = 0
    expired: int = 0
    cancelled: int = 0
    timed_out: int = 0  # waited max_queue_wait_s without a slot: 503
    boosted: int = 0
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
        self.timer = timer
        self.in_flight = 0
        self._waiting: list[Waiter] = []
        self._seq = itertools.count()
        self._stats: dict[Priority, ClassStats] = defaultdict(ClassStats)
        self._service_s = 0.0  # EWMA of time a dispatched request holds its slot
        self.max_waiting_seen = 0
        self._wake: asyncio.TimerHandle | None = None  # re-dispatch when a waiter ages up
        self._recent_classes: deque[tuple[float, int]] = deque(maxlen=200)  # (when, class)

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

    def _expected_wait_s(self, priority: Priority) -> tuple[float, int]:
        """Queued work at or above `priority`, drained at the share of the budget that higher
        classes (by recent dispatches) leave to it."""
        ahead = sum(1 for w in self._waiting if w.ctx.priority <= priority)
        horizon = self.timer() - self.starvation_threshold_s  # only the current traffic mix
        recent = [c for t, c in self._recent_classes if t >= horizon]
        higher = sum(1 for c in recent if c < priority) / len(recent) if recent else 0.0
        left = max(0.1, 1.0 - higher)
        usable = max(1, self.limit(priority))
        return (ahead / usable + 1) * self._service_s / left, ahead

    def _retry_after_s(self) -> float:
        backlog = len(self._waiting) / self.capacity * max(self._service_s, 0.05)
        return max(1.0, backlog)

    # ----------------------------------------------------------- the queue
    @asynccontextmanager
    async def slot(self, ctx: RequestContext) -> AsyncIterator[None]:
        await self.acquire(ctx)
        started = self.timer()
        try:
            yield
        finally:
            held = self.timer() - started
            self._service_s = held if self._service_s == 0 else 0.9 * self._service_s + 0.1 * held
            self.release()

    async def acquire(self, ctx: RequestContext) -> None:
        self._admit(ctx)
        stats = self._stats[ctx.priority]
        now = self.timer()
        if self.in_flight < self.limit(ctx.priority) and not self._waiting:
            self.in_flight += 1
            stats.dispatched += 1
            self._recent_classes.append((now, int(ctx.priority)))
            stats.queue_wait.observe(0.0)
            ctx.queue_waits.append(0.0)
            return
        waiter = Waiter(ctx, next(self._seq), now, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self.max_waiting_seen = max(self.max_waiting_seen, len(self._waiting))
        stats.queued += 1
        self._dispatch()  # waiters of lower classes may leave a reserved slot to this one
        # Wait for a slot until the deadline or the queue-wait bound, whichever comes first.
        remaining = None if ctx.deadline is None else max(0.0, ctx.deadline - now)
        bounded = remaining is None or self.max_queue_wait_s < remaining
        try:
            await asyncio.wait_for(
                asyncio.shield(waiter.future),
                self.max_queue_wait_s if bounded else remaining,
            )
        except TimeoutError:
            self._dispatch()  # aged up at this very moment, it may just now get a slot
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and (waiter.future.exception() is None)
            ):
                return  # dispatched in the same instant the wait ended: it holds a slot
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
            if (
                waiter.future.done()
                and not waiter.future.cancelled()
                and waiter.future.exception() is None  # an expired waiter holds no slot
            ):
                self.release()  # it had just been dispatched: hand the slot on
            else:
                self._forget(waiter)
            stats.cancelled += 1
            raise
        finally:
            stats.queued -= 1

    def _forget(self, waiter: Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()

    def release(self) -> None:
        self.in_flight -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        now = self.timer()
        while self.in_flight < self.capacity and self._waiting:
            waiter = self._pick(now)
            effective = waiter.effective_class(
                now, self.starvation_threshold_s, self.boost_interval_s
            )
            if self.in_flight >= self.limit(effective):
                # the best waiter may not take a reserved slot, nor may any after it; look
                # again when aging next moves it up a class
                self._wake_at_next_boost(waiter, now)
                break
            self._waiting.remove(waiter)
            stats = self._stats[waiter.ctx.priority]
            if waiter.ctx.deadline is not None and waiter.ctx.deadline <= now:
                waiter.future.set_exception(
                    DeadlineExceeded(f"deadline passed while queued for {self.name}")
                )
                stats.expired += 1
                continue
            if effective < waiter.ctx.priority:
                stats.boosted += 1
            self.in_flight += 1
            stats.dispatched += 1
            self._recent_classes.append((now, int(waiter.ctx.priority)))
            stats.queue_wait.observe(now - waiter.enqueued_at)
            waiter.ctx.queue_waits.append(now - waiter.enqueued_at)
            waiter.future.set_result(None)

    def _wake_at_next_boost(self, waiter: Waiter, now: float) -> None:
        delay = waiter.until_next_boost(now, self.starvation_threshold_s, self.boost_interval_s)
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
