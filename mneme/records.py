"""Runtime objects passed between deployments (never raw dicts)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Embeddings:
    vectors: Any  # np.ndarray (n, dim) float32, rows L2-normalised
    token_counts: list[int]

    def split(self, sizes: list[int]) -> list[Embeddings]:
        """Consecutive parts of `sizes` rows each: one merged call back into its callers'."""
        out, start = [], 0
        for size in sizes:
            end = start + size
            out.append(Embeddings(self.vectors[start:end], self.token_counts[start:end]))
            start = end
        return out


def in_callers_order(
    n: int, dim: int, parts: Iterable[tuple[Sequence[int], tuple[np.ndarray, list[int]]]]
) -> tuple[np.ndarray, list[int]]:
    """(vectors, token counts) of `n` texts encoded in parts out of order: each part is
    (its texts' positions among the `n`, (their vectors, their token counts))."""
    vectors = np.empty((n, dim), dtype=np.float32)
    counts = np.empty(n, dtype=np.int64)
    for rows, (part_vectors, part_counts) in parts:
        vectors[rows] = part_vectors
        counts[rows] = part_counts
    return vectors, counts.tolist()


@dataclass(frozen=True)
class NewMemory:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredMemory:
    id: str
    namespace: str
    text: str
    metadata: dict[str, Any]
    seq: int  # FAISS label: a new one with every write of the id
    # listing order: the seq of the id's first write, kept when it is replaced (so a page
    # walk does not meet a replaced memory again); -1 in snapshots older than the field
    position: int = -1


@dataclass(frozen=True)
class SearchHit:
    id: str
    text: str
    score: float
    metadata: dict[str, Any]


@dataclass(frozen=True)
class SearchQuery:
    namespace: str
    vector: Any  # np.ndarray, float32, L2-normalised
    top_k: int
    filter: dict[str, Any] | None = None


@dataclass(frozen=True)
class MemoryPage:
    memories: list[StoredMemory]
    next_cursor: str | None


@dataclass(frozen=True)
class MemoryContext:
    """Retrieved memories for a prompt, best first, and the instructions they follow. The
    Generator puts as many of them as fit its model's context in a system message."""

    instructions: str
    memories: tuple[str, ...]

    def system_message(self, count: int) -> tuple[str, str]:
        """The system message holding the best `count` memories."""
        lines = [self.instructions, "", "Memories:"]
        lines += [f"- {text}" for text in self.memories[:count]] or ["- (none)"]
        return ("system", "\n".join(lines))


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[tuple[str, str]]  # (role, content)
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    priority: int = 2
    context: MemoryContext | None = None  # put before `messages`, as many memories as fit

    def conversation(self, memories: int | None = None) -> list[tuple[str, str]]:
        """The messages the model sees, with the best `memories` of the context (all: None)."""
        if self.context is None:
            return list(self.messages)
        count = len(self.context.memories) if memories is None else memories
        return [self.context.system_message(count), *self.messages]


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    memories_used: int | None = None  # of the request's context (None: it had none)


@dataclass(frozen=True)
class GenerationDelta:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class BatchStats:
    """What a batching deployment records: calls and items per batch, and the seconds its
    model (or index) was busy on them, against the seconds since the replica started."""

    batches: int = 0
    calls: int = 0
    items: int = 0
    busy_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    calls_per_batch: dict[int, int] = field(default_factory=dict)
    # batches by items (texts, queries) in powers of two, keyed by the bucket's top: 3 and 4
    # items count under 4. A merged call from the Router is one call of many items.
    items_per_batch: dict[int, int] = field(default_factory=dict)

    @contextlib.contextmanager
    def batch(self, calls: int, items: int) -> Iterator[None]:
        """Wraps the work on one batch."""
        self.batches += 1
        self.calls += calls
        self.items += items
        self.calls_per_batch[calls] = self.calls_per_batch.get(calls, 0) + 1
        bucket = items_bucket(items)
        self.items_per_batch[bucket] = self.items_per_batch.get(bucket, 0) + 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - start

    def summary(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "calls": self.calls,
            "items": self.items,
            "busy_s": round(self.busy_s, 4),
            "uptime_s": round(time.monotonic() - self.started, 4),
            "mean_calls_per_batch": self.calls / self.batches if self.batches else 0.0,
            "mean_items_per_batch": self.items / self.batches if self.batches else 0.0,
            "max_calls_per_batch": max(self.calls_per_batch, default=0),
            "calls_per_batch": dict(sorted(self.calls_per_batch.items())),
            "items_per_batch": dict(sorted(self.items_per_batch.items())),
        }


def items_bucket(items: int) -> int:
    """The power of two at the top of `items`' bucket (1, 2, 4, 8, ...)."""
    return 1 << max(items - 1, 0).bit_length()
