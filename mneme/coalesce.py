"""Merging concurrent calls into one: fewer handle and actor calls per HTTP request.

On these 2 cores the per-call overhead of Ray Serve, not the model, is what binds
(DESIGN.md). A `Coalescer` sits in the Router in front of one downstream call that takes a
list (texts to embed, keys to look up): a submission that finds nothing in flight goes at
once (no window, so a lone request never waits); submissions made while `max_in_flight`
calls are running wait, and go together as the next call, the most urgent class first.
The batch grows with load by itself, with no timer.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

Split = Callable[[Any, list[int]], list[Any]]
T = TypeVar("T")


def split_list(result: Sequence[Any], sizes: list[int]) -> list[list[Any]]:
    """The default split: consecutive slices of a list result."""
    out, start = [], 0
    for size in sizes:
        out.append(list(result[start : start + size]))
        start += size
    return out


class Coalescer:
    """`submit(items)` returns a future of `call`'s result for those items alone."""

    def __init__(
        self,
        call: Callable[[list[Any]], Awaitable[Any]],
        split: Split = split_list,
        max_in_flight: int = 1,
        max_items: int = 256,
        orphaned: Callable[[Any], None] | None = None,
    ):
        """`orphaned(part)`: what to do with a part whose caller gave up while the merged
        call ran (release what the call claimed for it, say); by default it is dropped."""
        self._call = call
        self._split = split
        self._orphaned = orphaned
        self.max_in_flight = max_in_flight
        self.max_items = max_items
        # (class, arrival, items, future): the most urgent class goes in the next call first
        self._pending: list[tuple[int, int, list[Any], asyncio.Future]] = []
        self._arrivals = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self.in_flight = 0
        self.calls = 0
        self.submissions = 0
        self.items = 0

    def submit(self, items: list[Any], priority: int = 2) -> asyncio.Future:
        """`priority`: lower goes first (mneme.priority.Priority; default normal), so a
        critical request's items are not queued behind a background one's."""
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._pending, (priority, next(self._arrivals), items, future))
        self.submissions += 1
        if self.in_flight < self.max_in_flight:
            self._start()
        return future

    def _start(self) -> None:
        batch: list[tuple[list[Any], asyncio.Future]] = []
        size = 0
        while self._pending:
            _, _, items, future = self._pending[0]
            if batch and size + len(items) > self.max_items:
                break
            heapq.heappop(self._pending)
            if not future.cancelled():  # its caller gave up while it waited
                batch.append((items, future))
                size += len(items)
        if not batch:
            return
        self.in_flight += 1
        self.calls += 1
        self.items += size
        detached(self._run(batch), self._tasks)  # it serves every caller in it, not the first's

    async def _run(self, batch: list[tuple[list[Any], asyncio.Future]]) -> None:
        try:
            flat = [item for items, _ in batch for item in items]
            try:
                call = self._call(flat)
                _cancel_when_all_gone(call, [future for _, future in batch])
                result = await call
                parts = self._split(result, [len(items) for items, _ in batch])
            except BaseException as exc:  # every caller of the merged call sees its failure
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else _gone())
                if not isinstance(exc, Exception):
                    raise
                return
            for (_, future), part in zip(batch, parts, strict=True):
                if not future.done():
                    future.set_result(part)
                elif self._orphaned is not None:
                    self._orphaned(part)
        finally:
            self.in_flight -= 1
            if self._pending and self.in_flight < self.max_in_flight:
                self._start()

    def stats(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "submissions": self.submissions,
            "items": self.items,
            "submissions_per_call": self.submissions / self.calls if self.calls else 0.0,
        }


def _cancel_when_all_gone(call: Awaitable[Any], futures: list[asyncio.Future]) -> None:
    """A merged call that can be cancelled (a Serve handle call) is, once every caller in
    it has given up: nobody is left to take its result."""
    cancel = getattr(call, "cancel", None)  # a coroutine (a cache lookup) has none
    if cancel is None:
        return

    def one_done(_: asyncio.Future) -> None:
        if all(future.cancelled() for future in futures):
            cancel()

    for future in futures:
        future.add_done_callback(one_done)


def _gone() -> Exception:
    return RuntimeError("the merged call was cancelled (shutting down?)")


def detached(coroutine: Coroutine[Any, Any, T], running: set[asyncio.Task]) -> asyncio.Task[T]:
    """A task outside the current request's context, held in `running` until it ends (the
    event loop keeps only a weak reference). Ray Serve cancels a request's child calls when
    the request is cancelled (its client disconnected), and knows them by the context they
    were made in: work done for several requests, or work that must finish whatever happens
    to the request that started it, must not run in that context."""
    task = asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())
    running.add(task)
    task.add_done_callback(running.discard)
    return task


def fire_and_forget(future: asyncio.Future) -> None:
    """For a submission nobody awaits: retrieve its exception so asyncio does not warn."""
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
