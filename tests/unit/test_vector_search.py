"""The VectorSearch class in this process (no Serve): its health check against the log."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.vector_search import VectorSearch
from mneme.config import BatchConfig, StorageConfig, VectorSearchConfig
from mneme.durable import DurableStore
from mneme.records import NewMemory, SearchQuery
from tests.configs import IN_MEMORY_SEARCH

DIM = 8


def replica(data_dir, redis_url: str | None = None) -> VectorSearch:
    storage = StorageConfig(data_dir=str(data_dir), redis_url=redis_url)
    return VectorSearch.func_or_class(VectorSearchConfig(storage=storage))


class WriterBesideLog:
    """The real log, with another replica writing right after our last read found nothing:
    the moment a health check would see a write it has not applied yet."""

    def __init__(self, log, other: DurableStore, vector: np.ndarray):
        self._log, self._other, self._vector = log, other, vector
        self.written = False

    def after(self, position, limit=10_000):
        entries = self._log.after(position, limit)
        if not entries and not self.written:
            self.written = True
            self._other.upsert("a", [NewMemory("late", "written meanwhile")], self._vector)
        return entries

    def __getattr__(self, name):
        return getattr(self._log, name)


def test_a_write_by_another_replica_during_the_check_is_not_a_failure(tmp_path):
    vector = np.eye(DIM, dtype=np.float32)[:1]
    searcher, writer = replica(tmp_path), DurableStore(tmp_path)
    searcher._store.log = WriterBesideLog(searcher._store.log, writer, vector)
    asyncio.run(searcher.check_health())  # raised "1 logged writes not applied" before
    assert searcher._store.log.written
    # the next search applies it (`_search_groups`: a batch's body; `@serve.batch` needs Serve)
    [[hit]] = searcher._search_groups([SearchQuery("a", vector[0], top_k=1)])
    assert hit.id == "late"


@pytest.mark.redis
def test_the_check_fails_when_the_redis_log_cannot_be_read(tmp_path, log_redis):
    searcher = replica(tmp_path, log_redis.url)
    asyncio.run(searcher.check_health())
    log_redis.stop()
    with pytest.raises(Exception, match="(?i)connect"):
        asyncio.run(searcher.check_health())


def test_merged_searches_answer_each_query_as_it_would_alone():
    """`search_many` (a Router's merged searches) groups queries by namespace and filter
    into FAISS searches; every query still gets its own namespace's hits, its own top_k and
    its own filter, and the call counts as one batch of all its queries."""
    searcher = VectorSearch.func_or_class(IN_MEMORY_SEARCH)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((6, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for namespace in ("a", "b"):
        items = [
            NewMemory(f"{namespace}{i}", f"memory {i}", {"even": i % 2 == 0}) for i in range(6)
        ]
        asyncio.run(searcher.upsert(namespace, items, vectors))
    queries = [
        SearchQuery("a", vectors[0], top_k=3),
        SearchQuery("b", vectors[1], top_k=1),
        SearchQuery("a", vectors[2], top_k=6, filter={"even": True}),
        SearchQuery("b", vectors[3], top_k=2),
        SearchQuery("c", vectors[4], top_k=2),  # a namespace with nothing in it
    ]
    merged = asyncio.run(searcher.search_many(queries))
    alone = [searcher._search_groups([query]) for query in queries]
    assert merged == [hits for [hits] in alone]
    assert [hit.id for hit in merged[0]][0] == "a0" and len(merged[0]) == 3
    assert [hit.id for hit in merged[1]] == ["b1"]
    assert {hit.id for hit in merged[2]} == {"a0", "a2", "a4"}  # its filter, not its group's
    assert [hit.id for hit in merged[3]][0] == "b3" and len(merged[3]) == 2
    assert merged[4] == []
    stats = asyncio.run(searcher.stats())
    assert (stats["batches"], stats["calls"], stats["items"]) == (1, 1, 5)


def test_a_merged_call_longer_than_max_batch_size_is_searched_in_passes():
    """The replica's `max_batch_size` still bounds one FAISS pass (and the time the event
    loop is held), whatever the Router merged."""
    config = IN_MEMORY_SEARCH.model_copy(update={"batch": BatchConfig(max_batch_size=2)})
    searcher = VectorSearch.func_or_class(config)
    vectors = np.eye(DIM, dtype=np.float32)[:5]
    asyncio.run(
        searcher.upsert("a", [NewMemory(f"m{i}", f"memory {i}") for i in range(5)], vectors)
    )
    found = asyncio.run(searcher.search_many([SearchQuery("a", v, top_k=1) for v in vectors]))
    assert [hits[0].id for hits in found] == [f"m{i}" for i in range(5)]
    stats = asyncio.run(searcher.stats())
    assert (stats["batches"], stats["items"]) == (3, 5)
    assert stats["items_per_batch"] == {2: 2, 1: 1}
