"""The Prometheus exposition of a stats document: valid, typed, labelled by replica."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from cache.client import aggregate
from cache.shard import CacheShard, KindStats
from deployments.metrics import to_prometheus
from mneme.config import CacheConfig
from mneme.priority import Priority, RequestContext
from mneme.scheduler import PriorityScheduler
from mneme.stats import LatencyBook


def stats_document() -> dict:
    """A `/v1/stats` document made of the real parts (no Ray): a latency book, a scheduler
    that served one request, two cache shards."""
    latency = LatencyBook()
    latency.observe(("embeddings", "low", "2xx"), 0.012)
    latency.observe(("embeddings", "low", "5xx"), 0.5)
    scheduler = PriorityScheduler("embedder", 4)

    async def one_request():
        lease = await scheduler.acquire(RequestContext(Priority.LOW))
        scheduler.release(lease)

    asyncio.run(one_request())
    shards = [CacheShard(CacheConfig(), shard=i).stats() for i in range(2)]
    for i, shard in enumerate(shards):
        shard["kinds"]["embedding"] = KindStats(hits_l1=3 + i, misses=1).as_dict()
    cache = aggregate(shards, 2) | {"shards_answering": 2, "by_shard": dict(enumerate(shards))}
    embedder = {"batches": 3, "calls": 7, "busy_s": 0.5, "max_batch_size": 32,
                "calls_per_batch": {1: 2, 5: 1}, "items_per_batch": {1: 1, 32: 2},
                "replica": 'emb"1', "adaptive": True}  # fmt: skip
    return {
        "router": {
            "latency": latency.summary(),
            "coalesced": {"embed": {"calls": 2}, "search": {"calls": 1, "sent_alone": 3}},
            "joined_misses_computed": 0,
            "replica": "router-a",
        },  # fmt: skip
        "embedder": embedder,
        "vector_search": {"error": "TimeoutError"},
        "generator": {"requests": 4, "in_flight": 1, "replica": "gen-1"},
        "scheduler": {"embedder": scheduler.stats()},
        "cache": cache,
    }


def test_the_exposition_parses_with_one_typed_family_per_metric():
    text = to_prometheus(stats_document())
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # each family once, its samples together
    assert text.count("# TYPE") == len(families)
    kinds = {f.name: f.type for f in families}
    assert kinds["mneme_request_latency_ms"] == "summary"
    assert kinds["mneme_scheduler_queue_wait_ms"] == "summary"
    assert kinds["mneme_batches"] == kinds["mneme_cache_lookups"] == "counter"
    assert kinds["mneme_scheduler_queued"] == kinds["mneme_max_batch_size"] == "gauge"
    assert kinds["mneme_busy_seconds"] == "counter"
    for line in text.splitlines():  # every counter sample ends in _total
        name = line.split("{")[0]
        if not line.startswith("#") and kinds.get(name.removesuffix("_total")) == "counter":
            assert name.endswith("_total"), line


def test_every_series_names_the_replica_or_shard_it_came_from():
    families = {f.name: f for f in text_string_to_metric_families(to_prometheus(stats_document()))}
    latency = families["mneme_request_latency_ms"].samples
    assert {s.labels["status"] for s in latency} == {"2xx", "5xx"}
    assert {s.labels["replica"] for s in latency} == {"router-a"}
    counts = {s.labels["status"]: s.value for s in latency if s.name.endswith("_count")}
    assert counts == {"2xx": 1.0, "5xx": 1.0}
    batches = families["mneme_batches"].samples
    assert [s.labels["replica"] for s in batches] == ['emb"1']  # escaped, read back whole
    by_items = {
        s.labels["items_up_to"]: s.value for s in families["mneme_batches_by_items"].samples
    }
    assert by_items == {"1": 1.0, "32": 2.0}
    alone = families["mneme_coalesced_sent_alone"].samples  # searches an old replica refused
    assert [(s.labels["what"], s.value) for s in alone] == [("search", 3.0)]
    assert {s.labels["shard"] for s in families["mneme_cache_lookups"].samples} == {"0", "1"}
    up = {s.labels["deployment"]: s.value for s in families["mneme_up"].samples}
    assert up == {"embedder": 1.0, "vector_search": 0.0, "generator": 1.0}
    waits = families["mneme_scheduler_queue_wait_ms"].samples
    assert {s.labels["replica"] for s in waits} == {"router-a"}
