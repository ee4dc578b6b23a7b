"""One result shared by every caller for a short while: for a probe anyone may send.

`/healthz` is public (load balancers probe it) and asks every downstream for its stats. Without
this, each probe would cost three replica calls, so a flood of anonymous probes would load the
model replicas. Here concurrent callers share one check in flight, and a result younger than
`max_age_s` is served again, so a Router replica asks its downstreams at most once per
`max_age_s` however many probes arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedResult(Generic[T]):
    def __init__(
        self,
        produce: Callable[[], Awaitable[T]],
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._produce = produce
        self.max_age_s = max_age_s
        self._clock = clock
        self._value: tuple[float, T] | None = None  # (when it was produced, value)
        self._running: asyncio.Task[T] | None = None
        self.produced = 0

    async def get(self) -> T:
        if self._value is not None and self._clock() - self._value[0] < self.max_age_s:
            return self._value[1]
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        # shielded: a caller that goes away does not cancel the check the others wait for
        return await asyncio.shield(self._running)

    async def _refresh(self) -> T:
        try:
            value = await self._produce()
            self.produced += 1
            self._value = (self._clock(), value)
            return value
        finally:
            self._running = None
