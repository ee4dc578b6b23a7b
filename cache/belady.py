"""Offline reference policies for the hit-rate benchmark: plain LRU and Belady's optimum."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Sequence


def lru_hit_rate(trace: Sequence[int], capacity: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for key in trace:
        if key in cache:
            hits += 1
            cache.move_to_end(key)
        else:
            cache[key] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits / len(trace)


def belady_hit_rate(trace: Sequence[int], capacity: int) -> float:
    """Clairvoyant optimum (unit sizes, bypass allowed): evict the key used farthest ahead."""
    n = len(trace)
    next_use = [n] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(trace[i], n + i)  # never again: ordered by position, all > n
        last[trace[i]] = i
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next_use, key), lazily invalidated
    hits = 0
    for i, key in enumerate(trace):
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while -heap[0][0] != cached.get(heap[0][1]):
                heapq.heappop(heap)
            farthest = -heap[0][0]
            if next_use[i] >= farthest:  # bypass: the new key is needed later than all
                continue
            del cached[heapq.heappop(heap)[1]]
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], key))
    return hits / n
