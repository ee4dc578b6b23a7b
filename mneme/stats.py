"""Latency percentiles over a bounded window of recent observations."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np


class LatencyWindow:
    """The last `size` observations (seconds) of one series; percentiles reported in ms."""

    def __init__(self, size: int = 10_000):
        self._values: deque[float] = deque(maxlen=size)
        self.count = 0

    def observe(self, seconds: float) -> None:
        self._values.append(seconds)
        self.count += 1

    def summary(self) -> dict[str, float]:
        if not self._values:
            return {"count": self.count}
        p50, p95, p99 = np.percentile(np.fromiter(self._values, float), [50, 95, 99]) * 1000.0
        return {"count": self.count, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


class LatencyBook:
    """Latency windows keyed by label tuples, e.g. (route, priority)."""

    def __init__(self) -> None:
        self._windows: dict[tuple[str, ...], LatencyWindow] = defaultdict(LatencyWindow)

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        self._windows[labels].observe(seconds)

    def summary(self) -> dict[str, dict[str, float]]:
        return {"/".join(k): w.summary() for k, w in sorted(self._windows.items())}
