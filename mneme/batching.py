"""The adaptive batch window: wait for a batch to fill only as long as the load makes it pay.

A fixed window is waited out even by a lone request. Here the window is the configured
maximum scaled by how full a batch would get while waiting: with calls arriving at rate r,
a window w collects about r * w calls, so w = max_wait * min(1, r * max_wait / max_batch).
A call that finds the replica idle skips the window altogether (`Embedder.embed`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


class AdaptiveWindow:
    """Tracks the arrival rate of calls (an EWMA of inter-arrival gaps) and sizes the window."""

    def __init__(self, halflife_calls: float = 16.0, clock: Callable[[], float] = time.monotonic):
        self._alpha = 1.0 - 0.5 ** (1.0 / halflife_calls)
        self._clock = clock
        self._last: float | None = None
        self._mean_gap_s: float | None = None

    def observe(self) -> None:
        """One call arrived now."""
        now = self._clock()
        if self._last is not None:
            gap = max(now - self._last, 1e-6)
            if self._mean_gap_s is None:
                self._mean_gap_s = gap
            else:
                self._mean_gap_s += self._alpha * (gap - self._mean_gap_s)
        self._last = now

    @property
    def rate_per_s(self) -> float:
        return 0.0 if self._mean_gap_s is None else 1.0 / self._mean_gap_s

    def window_s(self, max_wait_s: float, max_batch_size: int) -> float:
        """The window for the next batch: grows linearly with load up to `max_wait_s`."""
        expected_calls = self.rate_per_s * max_wait_s
        return max_wait_s * min(1.0, expected_calls / max(max_batch_size, 1))


class BatchGate:
    """Admits each call of a `@serve.batch` method: at once when the replica is idle (and
    `at_once_when_idle`), else into the batch queue with the window sized from the current
    load (when `adaptive`).

    `at_once_when_idle=False` is for work that runs on the replica's event loop (VectorSearch's
    FAISS calls): the replica is idle whenever a call can arrive there, so every call would
    run alone. Such calls still batch without waiting: whatever queued while a batch ran is
    the next batch."""

    def __init__(
        self,
        batch_method,
        config,
        clock: Callable[[], float] = time.monotonic,
        at_once_when_idle: bool = True,
    ):
        self._method = batch_method
        self._at_once_when_idle = at_once_when_idle
        self._load = AdaptiveWindow(clock=clock)
        self.active = 0  # calls admitted and not yet answered
        self.at_once = 0
        self.apply(config)

    def apply(self, config) -> None:
        """A new `BatchConfig` (also from `user_config`, at run time)."""
        self.config = config
        self._method.set_max_batch_size(config.max_batch_size)
        self._method.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    @contextlib.contextmanager
    def admit(self) -> Iterator[bool]:
        """Yields True when the call should run at once instead of joining a batch."""
        self._load.observe()
        at_once = self.config.adaptive and self._at_once_when_idle and self.active == 0
        if self.config.adaptive and not at_once:
            self._method.set_batch_wait_timeout_s(self.window_s)
        self.at_once += at_once
        self.active += 1
        try:
            yield at_once
        finally:
            self.active -= 1

    @property
    def window_s(self) -> float:
        """The window a call joining a batch now waits at most: with `adaptive`, sized from
        the arrival rate last measured (0 before any load)."""
        if not self.config.adaptive:
            return self.config.batch_wait_timeout_s
        return self._load.window_s(self.config.batch_wait_timeout_s, self.config.max_batch_size)

    def stats(self) -> dict:
        return {
            **self.config.model_dump(),
            "dispatched_at_once": self.at_once,
            "window_ms": round(self.window_s * 1000.0, 3),
            "arrival_rate_per_s": round(self._load.rate_per_s, 2),
        }
