"""The compute cache through real HTTP, with a real Redis as L2."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
from ray import serve

from tests.integration.conftest import APP_NAME

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex}"


def embed(http, text, **headers):
    return http.post("/v1/embeddings", json={"input": text}, headers=headers)


def test_repeated_embedding_is_an_l1_hit_with_the_same_vector(http):
    text = unique("cache me")
    first, second = embed(http, text), embed(http, text)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit-l1"
    assert first.json()["data"] == second.json()["data"]
    assert first.json()["usage"] == second.json()["usage"]
    # normalised whitespace is the same text for the model, so the same entry
    assert embed(http, "  " + text.replace(" ", "   ") + " ").headers["x-cache"] == "hit-l1"


def test_a_batch_only_computes_its_misses(http):
    known = unique("known")
    embed(http, known)
    r = http.post("/v1/embeddings", json={"input": [known, unique("new")]})
    assert r.headers["x-cache"] == "miss"
    assert embed(http, known).headers["x-cache"] == "hit-l1"


def test_search_cache_is_invalidated_by_add_and_delete(http):
    space = f"c-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": space, "items": [{"id": "a", "text": "apples"}]})
    query = {"namespace": space, "query": "fruit", "top_k": 5}
    first = http.post("/v1/memories/search", json=query)
    second = http.post("/v1/memories/search", json=query)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit-l1")
    http.post("/v1/memories", json={"namespace": space, "items": [{"id": "b", "text": "pears"}]})
    after_add = http.post("/v1/memories/search", json=query)
    assert after_add.headers["x-cache"] == "miss"
    assert {h["id"] for h in after_add.json()["hits"]} == {"a", "b"}
    http.delete("/v1/memories/a", params={"namespace": space})
    after_delete = http.post("/v1/memories/search", json=query)
    assert after_delete.headers["x-cache"] == "miss"
    assert [h["id"] for h in after_delete.json()["hits"]] == ["b"]


def test_a_delete_of_no_possible_id_changes_nothing_and_one_that_finds_nothing_invalidates(http):
    """An id no add could have made is a 400 before anything is sent: the namespace's
    searches stay cached. A delete that finds nothing (404) still moves the version: it may
    be the retry of one that landed while its invalidation failed (its 503 says a retry is
    safe), and that retry must not leave the deleted memory in cached results."""
    space = f"c-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": space, "items": [{"id": "a", "text": "apples"}]})
    query = {"namespace": space, "query": "fruit", "top_k": 5}
    assert http.post("/v1/memories/search", json=query).headers["x-cache"] == "miss"
    for memory_id in ("not an id!", "x" * 129):
        r = http.delete(f"/v1/memories/{memory_id}", params={"namespace": space})
        assert r.status_code == 400 and r.json()["error"]["param"] == "id", r.text
        r = http.get(f"/v1/memories/{memory_id}", params={"namespace": space})
        assert r.status_code == 400
    assert http.post("/v1/memories/search", json=query).headers["x-cache"] == "hit-l1"
    r = http.delete("/v1/memories/absent", params={"namespace": space})
    assert r.status_code == 404 and r.json()["error"]["param"] == "id"
    assert http.post("/v1/memories/search", json=query).headers["x-cache"] == "miss"


def test_same_query_in_two_namespaces_never_shares_a_result(http):
    a, b = f"iso-{uuid.uuid4().hex[:8]}", f"iso-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": a, "items": [{"text": "alpha secret"}]})
    http.post("/v1/memories", json={"namespace": b, "items": [{"text": "beta note"}]})
    query = "what is the secret?"
    ra = http.post("/v1/memories/search", json={"namespace": a, "query": query})
    rb = http.post("/v1/memories/search", json={"namespace": b, "query": query})
    assert rb.headers["x-cache"] == "miss"
    assert [h["text"] for h in ra.json()["hits"]] == ["alpha secret"]
    assert [h["text"] for h in rb.json()["hits"]] == ["beta note"]


def test_answers_are_cached_per_namespace_version(http):
    space = f"ans-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": space, "items": [{"text": "Tea at 5"}]})
    body = {"namespace": space, "query": "when is tea?", "max_tokens": 6}
    first, second = (http.post("/v1/answer", json=body) for _ in range(2))
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit-l1")
    assert first.json() == second.json()
    http.post("/v1/memories", json={"namespace": space, "items": [{"text": "Coffee at 9"}]})
    assert http.post("/v1/answer", json=body).headers["x-cache"] == "miss"


def generations(http) -> int:
    return http.get("/v1/stats").json()["generator"]["requests"]


def test_an_answer_is_regenerated_only_when_its_memories_change(http):
    space = f"gen-{uuid.uuid4().hex[:8]}"
    add = {"namespace": space, "items": [{"id": "tea", "text": "Tea is served at 5 pm"}]}
    http.post("/v1/memories", json=add)
    body = {"namespace": space, "query": "When is tea served?", "top_k": 1, "max_tokens": 6}
    before = generations(http)
    first = http.post("/v1/answer", json=body)
    assert generations(http) == before + 1
    unrelated = {"namespace": space, "items": [{"id": "car", "text": "The car is in the garage"}]}
    http.post("/v1/memories", json=unrelated)
    same_memories = http.post("/v1/answer", json=body)
    assert same_memories.headers["x-cache"] == "miss"  # a new version: searched again
    assert same_memories.json() == first.json()
    assert generations(http) == before + 1  # ... but the same prompt: not generated again
    http.delete("/v1/memories/tea", params={"namespace": space})
    changed = http.post("/v1/answer", json=body)
    assert [m["id"] for m in changed.json()["memories"]] == ["car"]
    assert generations(http) == before + 2


def test_the_same_prompt_in_two_namespaces_is_generated_for_each(http):
    """Identical memories and question: the prompts match, the cache entries must not."""
    a, b = (f"gen-iso-{uuid.uuid4().hex[:8]}" for _ in range(2))
    text, query = unique("the vault code is"), "what is the vault code?"
    for space in (a, b):
        http.post("/v1/memories", json={"namespace": space, "items": [{"text": text}]})
    before = generations(http)
    for space in (a, b):
        r = http.post("/v1/answer", json={"namespace": space, "query": query, "max_tokens": 4})
        assert r.status_code == 200
    assert generations(http) == before + 2
    chat = {"messages": [{"role": "user", "content": query}], "max_tokens": 4, "temperature": 0}
    for space in (a, b):
        r = http.post("/v1/chat/completions", json={**chat, "memory": {"namespace": space}})
        assert r.status_code == 200
    assert generations(http) == before + 4


def test_only_deterministic_chat_is_cached(http):
    messages = [{"role": "user", "content": unique("chat")}]
    greedy = {"messages": messages, "max_tokens": 5, "temperature": 0}
    first, second = (http.post("/v1/chat/completions", json=greedy) for _ in range(2))
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit-l1")
    assert first.json()["choices"] == second.json()["choices"]
    seeded = {"messages": messages, "max_tokens": 5, "temperature": 1.0, "seed": 7}
    assert http.post("/v1/chat/completions", json=seeded).headers["x-cache"] == "miss"
    assert http.post("/v1/chat/completions", json=seeded).headers["x-cache"] == "hit-l1"
    sampled = {"messages": messages, "max_tokens": 5, "temperature": 1.0}
    assert "x-cache" not in http.post("/v1/chat/completions", json=sampled).headers


def test_x_cache_says_miss_whenever_the_model_generated(http):
    """Retrieval served from the cache, then a generation no cache stood for (sampled): the
    LLM ran, so the response is a miss; with a cached generation it is a hit."""
    space = f"xc-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": space, "items": [{"text": "Tea at 5"}]})
    query = unique("when is tea?")
    chat = {"messages": [{"role": "user", "content": query}], "max_tokens": 3}
    answer = {"namespace": space, "query": query, "max_tokens": 3}
    for path, sampled in (
        ("/v1/chat/completions", {**chat, "temperature": 1.0, "memory": {"namespace": space}}),
        ("/v1/answer", {**answer, "temperature": 1.0}),
    ):
        before = generations(http)
        tiers = [http.post(path, json=sampled).headers["x-cache"] for _ in range(2)]
        assert tiers == ["miss", "miss"] and generations(http) == before + 2
    greedy = {**chat, "temperature": 0, "memory": {"namespace": space}}
    tiers = [http.post("/v1/chat/completions", json=greedy).headers["x-cache"] for _ in range(2)]
    assert tiers == ["miss", "hit-l1"]


def test_concurrent_identical_misses_are_computed_once(served, http):
    text = unique("stampede")
    before = http.get("/v1/stats").json()["embedder"]["items"]

    def one(_: int) -> str:
        with served.client() as c:
            r = c.post("/v1/embeddings", json={"input": text})
            assert r.status_code == 200
            return r.headers["x-cache"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        tiers = list(pool.map(one, range(16)))
    assert http.get("/v1/stats").json()["embedder"]["items"] - before == 1
    assert "miss" in tiers


def test_prewarm_embeds_at_background_priority(http):
    texts = [unique("warm") for _ in range(3)]
    r = http.post("/v1/cache/prewarm", json={"texts": texts})
    assert r.status_code == 200 and r.json() == {"texts": 3, "already_cached": 0, "computed": 3}
    assert embed(http, texts[1]).headers["x-cache"] == "hit-l1"
    assert http.post("/v1/cache/prewarm", json={"texts": texts}).json()["computed"] == 0
    latency = http.get("/v1/stats").json()["router"]["latency"]
    assert latency["cache.prewarm/background/2xx"]["count"] >= 2
    assert http.post("/v1/cache/prewarm", json={"texts": []}).status_code == 400


def test_stats_report_hit_rates_per_kind(http):
    text = unique("stats")
    embed(http, text), embed(http, text)
    cache = http.get("/v1/stats").json()["cache"]
    embedding = cache["kinds"]["embedding"]
    assert embedding["hits_l1"] >= 1 and 0 < embedding["hit_rate"] < 1
    assert cache["l1"]["entries"] > 0 and cache["l1"]["bytes"] > 0
    assert cache["l2"]["breaker"] == ["closed"]
    assert 'mneme_cache_hit_rate{kind="embedding"}' in http.get("/metrics").text


def _l2_embedding_keys(served) -> int:
    client = redis.Redis.from_url(served.redis.url)
    return sum(1 for _ in client.scan_iter("mneme:embedding:*"))


def test_redis_killed_mid_test_then_restarted(served, http):
    """No request fails while Redis is gone; L2 is written again once it is back."""
    assert _l2_embedding_keys(served) > 0  # writes reached L2 so far
    served.redis.stop()
    try:
        statuses = [embed(http, unique("during outage")).status_code for _ in range(10)]
        statuses += [
            http.post(
                "/v1/memories/search", json={"namespace": "outage", "query": unique("q")}
            ).status_code
            for _ in range(5)
        ]
        assert statuses == [200] * 15
        assert http.get("/v1/stats").json()["cache"]["l2"]["errors"] >= 1
    finally:
        served.redis.start()  # same port, empty (no persistence in tests)
    deadline = time.monotonic() + 15
    while _l2_embedding_keys(served) == 0 and time.monotonic() < deadline:
        embed(http, unique("after restart"))
        time.sleep(0.5)
    assert _l2_embedding_keys(served) > 0
    assert http.get("/v1/stats").json()["cache"]["l2"]["breaker"] == ["closed"]


def test_semantic_answer_cache_serves_a_similar_question(http):
    """The test app turns it on (threshold 0.95); MiniLM is uncased, so case is 'similar'."""
    space = f"sem-{uuid.uuid4().hex[:8]}"
    http.post("/v1/memories", json={"namespace": space, "items": [{"text": "Tea is at 5pm"}]})
    body = {"namespace": space, "max_tokens": 6}
    first = http.post("/v1/answer", json={**body, "query": "When is tea served?"})
    similar = http.post("/v1/answer", json={**body, "query": "WHEN IS TEA SERVED?"})
    other = http.post("/v1/answer", json={**body, "query": "Who painted the ceiling?"})
    assert first.headers["x-cache"] == "miss"
    assert similar.headers["x-cache"] == "hit-semantic"
    assert similar.json() == first.json()
    assert other.headers["x-cache"] == "miss"
    different_params = http.post(
        "/v1/answer", json={**body, "query": "WHEN IS TEA SERVED?", "top_k": 2}
    )
    assert different_params.headers["x-cache"] == "miss"
    http.post("/v1/memories", json={"namespace": space, "items": [{"text": "Tea moved to 6"}]})
    again = http.post("/v1/answer", json={**body, "query": "when is tea served?"})
    assert again.headers["x-cache"] == "miss"
    assert http.get("/v1/stats").json()["cache"]["semantic_answers"]["hits"] >= 1


def test_a_text_twice_in_one_request_is_embedded_once(http):
    text = unique("twice")
    before = http.get("/v1/stats").json()["embedder"]["items"]
    r = http.post("/v1/embeddings", json={"input": [text, unique("other"), text]})
    assert r.status_code == 200 and r.headers["x-cache"] == "miss"
    data = r.json()["data"]
    assert data[0]["embedding"] == data[2]["embedding"] != data[1]["embedding"]
    assert http.get("/v1/stats").json()["embedder"]["items"] - before == 2


def test_a_text_sharing_a_cache_key_is_never_served_another_texts_vector(http):
    """Vertical tab and form feed are spaces to the cache key but dropped by the tokenizer
    ('reset\\vmy' would be 'resetmy'): whoever embeds first must not decide the vector that
    another namespace's caller gets for 'reset my password' (the cache is shared)."""
    suffix = uuid.uuid4().hex
    spaced, clean = f"reset\x0bmy\x0cpassword {suffix}", f"reset my password {suffix}"
    first = embed(http, spaced)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    second = embed(http, clean)
    assert second.headers["x-cache"] == "hit-l1"  # one key for both
    embedder = serve.get_deployment_handle("Embedder", app_name=APP_NAME)
    model = embedder.embed.remote([clean]).result().vectors[0]
    for response in (first, second):
        served = np.asarray(response.json()["data"][0]["embedding"], dtype=np.float32)
        assert np.allclose(served, model, atol=1e-5)
