"""The memory API through real HTTP: add, search, get, list, delete, isolation, upserts."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def ns() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def add(http, namespace, items, **extra):
    r = http.post("/v1/memories", json={"namespace": namespace, "items": items, **extra})
    assert r.status_code == 200, r.text
    return r.json()["ids"]


def search(http, namespace, query, **extra):
    r = http.post("/v1/memories/search", json={"namespace": namespace, "query": query, **extra})
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def test_add_then_search_finds_the_closest_memory_first(http):
    space = ns()
    ids = add(
        http,
        space,
        [
            {"text": "The user's cat is called Miso", "metadata": {"kind": "pet"}},
            {"text": "The user prefers window seats on flights", "metadata": {"kind": "travel"}},
            {"text": "Quarterly revenue grew by 12 percent", "metadata": {"kind": "work"}},
        ],
    )
    assert len(ids) == 3 and len(set(ids)) == 3
    hits = search(http, space, "what is the name of my cat?", top_k=3)
    assert [h["id"] for h in hits][0] == ids[0]
    assert hits[0]["text"] == "The user's cat is called Miso"
    assert hits[0]["metadata"] == {"kind": "pet"}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_top_k_and_metadata_filter(http):
    space = ns()
    add(
        http,
        space,
        [{"text": f"note number {i}", "metadata": {"parity": i % 2}} for i in range(10)],
    )
    assert len(search(http, space, "note", top_k=4)) == 4
    odd = search(http, space, "note", top_k=10, filter={"parity": 1})
    assert len(odd) == 5 and all(h["metadata"]["parity"] == 1 for h in odd)
    assert search(http, space, "note", filter={"parity": 7}) == []


def test_unicode_text_round_trips_and_is_searchable(http):
    space = ns()
    texts = ["我喜欢在周末爬山", "Ich wohne in München 🏔️", "naïve café — ünïcödé"]
    ids = add(http, space, [{"text": t} for t in texts])
    for memory_id, text in zip(ids, texts, strict=True):
        got = http.get(f"/v1/memories/{memory_id}", params={"namespace": space}).json()
        assert got["text"] == text
    assert search(http, space, "我喜欢在周末爬山", top_k=1)[0]["id"] == ids[0]


def test_namespaces_are_isolated(http):
    a, b = ns(), ns()
    [secret] = add(http, a, [{"text": "tenant A's secret launch date is March 3"}])
    add(http, b, [{"text": "tenant B likes tea"}])
    hits = search(http, b, "tenant A's secret launch date is March 3", top_k=10)
    assert [h["text"] for h in hits] == ["tenant B likes tea"]
    assert http.get(f"/v1/memories/{secret}", params={"namespace": b}).status_code == 404
    assert http.delete(f"/v1/memories/{secret}", params={"namespace": b}).status_code == 404
    listed = http.get("/v1/memories", params={"namespace": b}).json()["data"]
    assert [m["text"] for m in listed] == ["tenant B likes tea"]
    assert http.get(f"/v1/memories/{secret}", params={"namespace": a}).status_code == 200


def test_re_adding_an_id_replaces_it_and_stores_one_copy(http):
    space = ns()
    add(http, space, [{"id": "m1", "text": "first version", "metadata": {"v": 1}}])
    add(http, space, [{"id": "m1", "text": "first version", "metadata": {"v": 1}}])  # retry
    add(http, space, [{"id": "m1", "text": "second version", "metadata": {"v": 2}}])
    listed = http.get("/v1/memories", params={"namespace": space}).json()["data"]
    assert [(m["id"], m["text"], m["metadata"]) for m in listed] == [
        ("m1", "second version", {"v": 2})
    ]
    hits = search(http, space, "version", top_k=10)
    assert [(h["id"], h["text"]) for h in hits] == [("m1", "second version")]


def test_get_delete_and_list_with_paging(http):
    space = ns()
    ids = add(http, space, [{"text": f"fact {i}", "id": f"f{i}"} for i in range(7)])
    seen, cursor = [], None
    while True:
        params = {"namespace": space, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = http.get("/v1/memories", params=params).json()
        seen += [m["id"] for m in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    r = http.delete("/v1/memories/f3", params={"namespace": space})
    assert r.status_code == 200 and r.json() == {"id": "f3", "deleted": True}
    assert http.get("/v1/memories/f3", params={"namespace": space}).status_code == 404
    assert http.delete("/v1/memories/f3", params={"namespace": space}).status_code == 404
    assert all(h["id"] != "f3" for h in search(http, space, "fact 3", top_k=10))


def test_search_equals_brute_force_over_the_stored_vectors(http):
    space = ns()
    rng = np.random.default_rng(7)
    words = ["river", "mountain", "invoice", "guitar", "lemon", "orbit", "castle", "engine"]
    texts = [" ".join(rng.choice(words, size=5)) + f" #{i}" for i in range(40)]
    ids = add(http, space, [{"text": t, "id": f"v{i}"} for i, t in enumerate(texts)])
    vectors = np.array(
        [e["embedding"] for e in http.post("/v1/embeddings", json={"input": texts}).json()["data"]],
        dtype=np.float32,
    )
    for query in ["mountain river castle", "lemon invoice", "orbit engine guitar"]:
        q = np.array(
            http.post("/v1/embeddings", json={"input": query}).json()["data"][0]["embedding"],
            dtype=np.float32,
        )
        expected = [ids[i] for i in np.argsort(-(vectors @ q), kind="stable")[:5]]
        hits = search(http, space, query, top_k=5)
        assert [h["id"] for h in hits] == expected
        np.testing.assert_allclose(
            [h["score"] for h in hits], np.sort(vectors @ q)[::-1][:5], rtol=1e-4, atol=1e-5
        )


def test_concurrent_adds_to_one_namespace_all_land(served, http):
    """FAISS aborts the process on concurrent writes; the replica must serialise them
    (merged embeds return together, so the adds reach VectorSearch at the same moment)."""
    from concurrent.futures import ThreadPoolExecutor

    space = ns()

    def add_many(batch: int) -> list[str]:
        items = [{"id": f"m{batch}-{i}", "text": f"memory {batch} {i} of many"} for i in range(20)]
        with served.client() as client:
            r = client.post("/v1/memories", json={"namespace": space, "items": items})
            assert r.status_code == 200, r.text
            return r.json()["ids"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = [i for batch in pool.map(add_many, range(8)) for i in batch]
    assert len(set(ids)) == 160
    listed, cursor = [], None
    while True:
        params = {"namespace": space, "limit": 100} | ({"cursor": cursor} if cursor else {})
        page = http.get("/v1/memories", params=params).json()
        listed += [m["id"] for m in page["data"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert sorted(listed) == sorted(ids)
