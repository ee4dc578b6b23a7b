"""Latency percentiles over a bounded window of recent observations, and replica occupancy."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable

import numpy as np


class LatencyWindow:
    """The last `size` observations (seconds) of one series; percentiles reported in ms."""

    def __init__(self, size: int = 10_000):
        self._values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total_s = 0.0  # over every observation, not only the window's

    def observe(self, seconds: float) -> None:
        self._values.append(seconds)
        self.count += 1
        self.total_s += seconds

    def summary(self) -> dict[str, float]:
        out = {"count": self.count, "sum_ms": self.total_s * 1000.0}
        if self._values:
            p50, p95, p99 = np.percentile(np.fromiter(self._values, float), [50, 95, 99]) * 1000.0
            out |= {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99}
        return out


class LatencyBook:
    """Latency windows keyed by label tuples, e.g. (route, priority)."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, ...], LatencyWindow] = defaultdict(LatencyWindow)

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        self._windows[labels].observe(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        return {"/".join(k): w.summary() for k, w in sorted(self._windows.items())}


class Occupancy:
    """Time-weighted occupancy of a replica that runs many requests at once (vLLM's
    continuous batching): seconds with at least one request in flight, and the mean number
    in flight over those seconds (its effective batch size)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        self.in_flight = 0
        self._since = self.started
        self._busy_s = 0.0
        self._request_s = 0.0  # integral of in_flight over time

    def _advance(self) -> None:
        now = self._clock()
        if self.in_flight:
            self._busy_s += now - self._since
            self._request_s += self.in_flight * (now - self._since)
        self._since = now

    def enter(self) -> None:
        self._advance()
        self.in_flight += 1

    def exit(self) -> None:
        self._advance()
        self.in_flight -= 1

    def summary(self) -> dict[str, float]:
        self._advance()
        return {
            "in_flight": self.in_flight,
            "busy_s": round(self._busy_s, 4),
            "uptime_s": round(self._clock() - self.started, 4),
            "mean_in_flight_when_busy": self._request_s / self._busy_s if self._busy_s else 0.0,
        }
