"""VectorSearch deployment: the FAISS memory store, with search calls batched per namespace."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import numpy as np
from ray import serve

from deployments.replica import DOWNSTREAM_LOGGING, identity, max_ongoing_requests
from mneme.batching import BatchGate
from mneme.config import VectorSearchConfig, parse_batch_config
from mneme.durable import DurableStore
from mneme.index import MemoryStore
from mneme.records import BatchStats, MemoryPage, NewMemory, SearchHit, SearchQuery, StoredMemory


@serve.deployment(
    max_ongoing_requests=128,
    ray_actor_options={"num_cpus": 0.25},
    logging_config=DOWNSTREAM_LOGGING,
)
class VectorSearch:
    """Every namespace's index: a view of the memory log (`mneme/durable.py`) when
    `storage.data_dir` is set, so replicas sharing that directory serve the same memories."""

    def __init__(self, config: VectorSearchConfig):
        self._config = config
        storage = config.storage
        data_dir = storage.resolved_data_dir()
        if data_dir is None:
            self._store: MemoryStore | DurableStore = MemoryStore(index_config=config.index)
        else:  # replays the log after the newest snapshot before serving anything
            self._store = DurableStore(
                data_dir,
                storage.synchronous,
                storage.snapshot_every_writes,
                config.index,
                storage.redis_url,
            )
        self._stats = BatchStats()
        self._gate = BatchGate(self._search_batch, config.batch, at_once_when_idle=False)

    def reconfigure(self, user_config: dict | None) -> None:
        self._gate.apply(parse_batch_config(user_config, self._config.batch))

    # Every method is `async` on purpose: Serve runs a plain `def` method in a thread pool,
    # and FAISS aborts the process on concurrent writes (seen: SIGABRT in add_with_ids under
    # 4 concurrent adds). On the event loop, writes and searches never interleave half-way.
    async def upsert(
        self, namespace: str, items: list[NewMemory], vectors: np.ndarray
    ) -> list[str]:
        return self._store.upsert(namespace, items, vectors)

    async def delete(self, namespace: str, memory_id: str) -> bool:
        return self._store.delete(namespace, memory_id)

    async def get(self, namespace: str, memory_id: str) -> StoredMemory | None:
        return self._store.get(namespace, memory_id)

    async def page(self, namespace: str, limit: int, cursor: int | None) -> MemoryPage:
        return self._store.page(namespace, limit, cursor)

    async def search(self, query: SearchQuery) -> list[SearchHit]:
        with self._gate.admit():
            return await self._search_batch(query)

    async def search_many(self, queries: list[SearchQuery]) -> list[list[SearchHit]]:
        """A Router's merged searches (`router.coalesce`), with no window (the Router merged
        what arrived together): one FAISS search per namespace and filter, in passes of at
        most `max_batch_size` queries, each a batch, with other calls (writes, the health
        check) let in between them, as between `@serve.batch` batches."""
        size = self._gate.config.max_batch_size
        found: list[list[SearchHit]] = []
        for start in range(0, len(queries), size):
            if start:
                await asyncio.sleep(0)
            part = queries[start : start + size]
            with self._stats.batch(1, len(part)):
                found += self._search_groups(part)
        return found

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _search_batch(self, queries: list[SearchQuery]) -> list[list[SearchHit]]:
        with self._stats.batch(len(queries), len(queries)):
            return self._search_groups(queries)

    def _search_groups(self, queries: list[SearchQuery]) -> list[list[SearchHit]]:
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[(q.namespace, _filter_key(q.filter))].append(i)
        searches = [
            (
                namespace,
                np.stack([np.asarray(queries[i].vector, dtype=np.float32) for i in rows]),
                max(queries[i].top_k for i in rows),
                queries[rows[0]].filter,
            )
            for (namespace, _), rows in groups.items()
        ]
        results: list[list[SearchHit]] = [[] for _ in queries]
        found = self._store.search_many(searches)
        for rows, group_hits in zip(groups.values(), found, strict=True):
            for i, hits in zip(rows, group_hits, strict=True):
                results[i] = hits[: queries[i].top_k]
        return results

    async def check_health(self) -> None:
        """Unhealthy (Serve restarts the replica) when the log cannot be read or applied.
        Writes another replica logs meanwhile are no failure: the next call applies them.
        Indexes rebuilt in the background since are swapped in, traffic or not."""
        if isinstance(self._store, DurableStore):
            self._store.catch_up()
        self._store.finish_rebuilds()

    def __del__(self):
        """Serve's graceful shutdown of the replica: a snapshot being written in the
        background lands first (a killed one would leave only its temporary file)."""
        store = getattr(self, "_store", None)
        if isinstance(store, DurableStore):
            store.wait_for_snapshot()

    async def stats(self) -> dict:
        return {
            **self._stats.summary(),
            **self._gate.stats(),
            **self._store.stats(),
            **identity(),
            "max_ongoing_requests": max_ongoing_requests(),
        }


def _filter_key(flt: dict[str, Any] | None) -> str:
    return json.dumps(flt, sort_keys=True) if flt else ""
