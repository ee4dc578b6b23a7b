"""The VectorSearch class in this process (no Serve): its health check against the log."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from deployments.vector_search import VectorSearch
from mneme.config import StorageConfig, VectorSearchConfig
from mneme.durable import DurableStore
from mneme.records import NewMemory, SearchQuery

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
