"""L1 eviction policy: W-TinyLFU with TTLs, bounded by entries and by bytes.

Recency and frequency both count: new keys enter a small LRU window; a key leaving the
window is admitted into the main segmented LRU only if it has been seen more often than the
main's eviction victim (TinyLFU admission), so one-off keys never flush hot ones. Frequencies
are counted over a sliding sample and halved periodically, so yesterday's hot keys fade.

Pure Python with an injectable clock (`timer=`): unit-tested without Ray or sleeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

WINDOW_FRACTION = 0.01
PROTECTED_FRACTION = 0.8
SAMPLE_FACTOR = 30  # frequencies are halved every SAMPLE_FACTOR * max_entries accesses


@dataclass
class Entry:
    value: Any
    size: int
    ttl_s: float
    created_at: float
    expires_at: float
    hits: int = 0


class FrequencySketch:
    """TinyLFU's count-min sketch: 4 rows of saturating 4-bit-range counters in bytearrays.

    Fixed memory (4 bytes per counter column, about `sample_size / 2` columns); every
    `sample_size` increments all counters are halved, so old popularity fades.
    """

    DEPTH = 4
    MAX_COUNT = 15
    _HALVE = bytes(v // 2 for v in range(256))

    def __init__(self, sample_size: int):
        self.sample_size = max(16, sample_size)
        width = 1 << max(4, (self.sample_size // 2 - 1).bit_length())
        self._mask = width - 1
        self._rows = [bytearray(width) for _ in range(self.DEPTH)]
        self._accesses = 0

    def _columns(self, key: Hashable) -> list[int]:
        # Kirsch-Mitzenmacher double hashing: DEPTH indices from one 64-bit mix of hash(key)
        h = (hash(key) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        a, b = h & 0xFFFFFFFF, (h >> 32) | 1
        return [(a + i * b) & self._mask for i in range(self.DEPTH)]

    def increment(self, key: Hashable) -> None:
        columns = self._columns(key)
        current = min(row[c] for row, c in zip(self._rows, columns, strict=True))
        if current < self.MAX_COUNT:  # conservative update: raise only the minimum counters
            for row, c in zip(self._rows, columns, strict=True):
                if row[c] == current:
                    row[c] = current + 1
        self._accesses += 1
        if self._accesses >= self.sample_size:
            self._accesses //= 2
            self._rows = [bytearray(row.translate(self._HALVE)) for row in self._rows]

    def frequency(self, key: Hashable) -> int:
        columns = self._columns(key)
        return min(row[c] for row, c in zip(self._rows, columns, strict=True))


class TinyLfuCache:
    """A dict-like cache: `get`, `set`, `delete`; expired entries are never returned."""

    def __init__(
        self,
        max_entries: int,
        max_bytes: int | None = None,
        *,
        hot_after_hits: int = 10,
        hot_ttl_factor: float = 5.0,
        timer: Callable[[], float] = time.monotonic,
    ):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hot_after_hits = hot_after_hits
        self.hot_ttl_factor = hot_ttl_factor
        self.timer = timer
        self._window_cap = max(1, int(max_entries * WINDOW_FRACTION))
        self._main_cap = max(1, max_entries - self._window_cap)
        self._protected_cap = max(1, int(self._main_cap * PROTECTED_FRACTION))
        self._window: OrderedDict[Hashable, Entry] = OrderedDict()
        self._probation: OrderedDict[Hashable, Entry] = OrderedDict()
        self._protected: OrderedDict[Hashable, Entry] = OrderedDict()
        self._sketch = FrequencySketch(SAMPLE_FACTOR * max_entries)
        self.bytes = 0
        self.evictions = 0
        self.expirations = 0

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def __contains__(self, key: Hashable) -> bool:
        entry = self._find(key)
        return entry is not None and entry.expires_at > self.timer()

    def _segment_of(self, key: Hashable) -> OrderedDict[Hashable, Entry] | None:
        for segment in (self._window, self._probation, self._protected):
            if key in segment:
                return segment
        return None

    def _find(self, key: Hashable) -> Entry | None:
        segment = self._segment_of(key)
        return segment[key] if segment is not None else None

    # ------------------------------------------------------------------ reads
    def get(self, key: Hashable) -> Any | None:
        self._sketch.increment(key)
        segment = self._segment_of(key)
        if segment is None:
            return None
        entry = segment[key]
        now = self.timer()
        if entry.expires_at <= now:
            self._remove(segment, key)
            self.expirations += 1
            return None
        entry.hits += 1
        if entry.hits == self.hot_after_hits:  # hot: its TTL grows once, from its creation
            entry.expires_at = entry.created_at + entry.ttl_s * self.hot_ttl_factor
        self._touch(segment, key)
        return entry.value

    def _touch(self, segment: OrderedDict[Hashable, Entry], key: Hashable) -> None:
        if segment is self._probation:  # a second hit in main: promote to protected
            self._protected[key] = self._probation.pop(key)
            if len(self._protected) > self._protected_cap:
                demoted, entry = self._protected.popitem(last=False)
                self._probation[demoted] = entry
        else:
            segment.move_to_end(key)

    # ----------------------------------------------------------------- writes
    def set(self, key: Hashable, value: Any, ttl_s: float, size: int = 1) -> None:
        now = self.timer()
        segment = self._segment_of(key)
        if segment is not None:
            self._remove(segment, key)
        else:
            self._sketch.increment(key)
        self._window[key] = Entry(value, size, ttl_s, now, now + ttl_s)
        self.bytes += size
        if len(self._window) > self._window_cap:
            self._admit(*self._window.popitem(last=False))
        self._enforce_bytes()

    def _admit(self, key: Hashable, entry: Entry) -> None:
        """A key leaving the window enters main if there is room or it beats main's victim."""
        if len(self._probation) + len(self._protected) < self._main_cap:
            self._probation[key] = entry
            return
        victims = self._probation if self._probation else self._protected
        victim_key = next(iter(victims))
        if self._sketch.frequency(key) > self._sketch.frequency(victim_key):
            self._evict(victims, victim_key)
            self._probation[key] = entry
        else:
            self.bytes -= entry.size
            self.evictions += 1

    def _enforce_bytes(self) -> None:
        if self.max_bytes is None:
            return
        for segment in (self._probation, self._protected, self._window):
            while self.bytes > self.max_bytes and segment:
                self._evict(segment, next(iter(segment)))

    def _evict(self, segment: OrderedDict[Hashable, Entry], key: Hashable) -> None:
        self._remove(segment, key)
        self.evictions += 1

    def _remove(self, segment: OrderedDict[Hashable, Entry], key: Hashable) -> None:
        self.bytes -= segment.pop(key).size

    def delete(self, key: Hashable) -> bool:
        segment = self._segment_of(key)
        if segment is None:
            return False
        self._remove(segment, key)
        return True
