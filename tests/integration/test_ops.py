"""Operations: health, stats, Prometheus metrics, the cache actors' lifecycle."""

import asyncio
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cache.client import CacheClient, cache_actors, shard_actor_name
from cache.reset import reset
from mneme.config import CacheConfig
from tests.integration.conftest import APP_NAME, wait_until

pytestmark = pytest.mark.slow


def test_healthz_reports_every_downstream(http):
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "unavailable": []}


def test_stats_and_metrics(http):
    low = {"X-Priority": "low"}
    http.post("/v1/embeddings", json={"input": "stats probe"}, headers=low)
    too_long = http.post("/v1/embeddings", json={"input": "x" * 9000}, headers=low)
    assert too_long.status_code == 400
    stats = http.get("/v1/stats").json()
    latency = stats["router"]["latency"]
    assert latency["embeddings/low/2xx"]["count"] >= 1
    assert latency["embeddings/low/4xx"]["count"] >= 1  # errors count too
    assert stats["vector_search"]["max_batch_size"] == 64
    assert stats["generator"]["model"] == "mneme-tiny-llama"
    # on CPU the model runs inside vLLM's engine-core process (vLLM would swap in "mp")
    assert stats["generator"]["executor"] == "uni"
    # the default 64 MiB (1 KiB a token), not 0.3 of the node (millions of tokens), and room
    # for 32 sequences of 512 tokens
    assert 32 * 512 <= stats["generator"]["kv_cache_tokens"] <= 64 * 1024
    metrics = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(metrics)}  # valid format
    assert families["mneme_request_latency_ms"].type == "summary"
    requests = [
        s
        for s in families["mneme_request_latency_ms"].samples
        if s.name.endswith("_count") and s.labels["route"] == "embeddings"
    ]
    assert {s.labels["status"] for s in requests} >= {"2xx", "4xx"}
    assert all(s.labels["replica"] == stats["router"]["replica"] for s in requests)
    batches = families["mneme_batches"]  # the family of mneme_batches_total
    assert batches.type == "counter"
    assert any(s.labels["deployment"] == "embedder" for s in batches.samples)


def test_every_response_that_queued_says_so_errors_and_streams_included(http):
    """X-Queue-Wait-Ms was set only on the answers an endpoint returned itself."""
    listed = http.get("/v1/memories", params={"namespace": "ops-headers"})
    missing = http.get("/v1/memories/nothing-here", params={"namespace": "ops-headers"})
    assert missing.status_code == 404
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=chat) as streamed:
        streamed.read()
    for r in (listed, missing, streamed):
        assert float(r.headers["x-queue-wait-ms"]) >= 0.0, r.headers


def test_a_full_downstream_is_503_with_retry_after_never_500(served):
    """Fill the Generator's budget and queue: normal requests may run 3 (the 4th slot is
    reserved for critical and high) and queue 16 in the test app."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int):
        with served.client() as c:
            r = c.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "overload"}],
                    "max_tokens": 256,  # long enough that the queue is full as the last arrive
                },
            )
            return r.status_code, r.headers.get("retry-after"), r.json()

    with served.client() as c:  # the budget derived from the Generator's replicas, not its default
        wait_until(
            lambda: c.get("/v1/stats").json()["scheduler"]["generator"]["capacity"] == 4,
            what="the Generator's budget is 4",
        )
    with ThreadPoolExecutor(max_workers=28) as pool:
        results = list(pool.map(one, range(28)))
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 19 and statuses.count(503) >= 1, statuses
    for status, retry_after, body in results:
        if status == 503:
            assert retry_after is not None and int(retry_after) >= 1
            assert body["error"]["code"] == "overloaded"


def test_access_log_has_the_http_request_not_the_downstream_calls(http):
    """Serve's access log: one line per HTTP request in the Router's log; the Embedder call it
    makes is not logged (`DOWNSTREAM_LOGGING`), while the Embedder's own log still runs."""
    import glob
    import uuid

    import ray

    logs = ray._private.worker.global_worker.node.get_logs_dir_path()

    def lines(deployment: str) -> list[str]:
        out: list[str] = []
        for path in glob.glob(f"{logs}/serve/replica_mneme_{deployment}_*.log"):
            with open(path) as f:
                out += f.readlines()
        return out

    embedder_before = len(lines("Embedder"))
    marker = f"access log probe {uuid.uuid4()}"  # a new text: the Embedder is called
    r = http.post("/v1/embeddings", json={"input": marker})
    assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    request_id = r.headers["x-request-id"]
    wait_until(
        lambda: any(request_id in line and "POST /v1/embeddings 200" in line
                    for line in lines("Router")),
        timeout_s=10,
        what="the Router's access log line for the request",
    )  # fmt: skip
    embedder_new = lines("Embedder")[embedder_before:]
    assert not [line for line in embedder_new if " CALL " in line], embedder_new[-5:]
    assert lines("Embedder"), "the Embedder writes its log file (start-up lines at least)"


def test_the_cache_keeps_its_shard_count_and_is_reset_only_once_its_app_is_gone(served):
    """Routers adopt the running cache actors' shard count (an old and a new config side by
    side map every namespace alike); `python -m cache.reset` stops an application's actors,
    so that the next deploy starts them with its config, and refuses while it is deployed."""
    app = "reset-test"

    async def client(shards: int) -> CacheClient:
        return await CacheClient.connect(CacheConfig(shards=shards), app)

    async def scenario():
        neighbour = await CacheClient.connect(CacheConfig(), app + "2")  # a name sharing a prefix
        first = await client(2)
        assert len(first.shards) == 2
        later = await client(3)  # a new config while the cache runs: it keeps its 2
        assert len(later.shards) == 2
        assert (await later.stale_settings())["shards"] == (2, 3)
        assert reset(app) == [shard_actor_name(app, 0), shard_actor_name(app, 1)]
        assert cache_actors(app) == []
        after = await client(3)
        assert len(after.shards) == 3 and await after.stale_settings() == {}
        assert [name for _, name, _ in cache_actors(app + "2")] == [shard_actor_name(app + "2", 0)]
        assert len(neighbour.shards) == 1
        return reset(app), reset(app + "2")

    stopped, neighbour = asyncio.run(scenario())
    assert len(stopped) == 3 and len(neighbour) == 1
    with pytest.raises(RuntimeError, match="is deployed"):
        reset(APP_NAME)
    refused = subprocess.run(
        [sys.executable, "-m", "cache.reset", "--app", APP_NAME],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 1 and "is deployed" in refused.stderr, refused.stderr
    untouched = [(shard, name) for shard, name, _ in cache_actors(APP_NAME)]
    assert untouched == [(0, shard_actor_name(APP_NAME, 0))]
