"""The FAISS store against a brute-force model of the expected state."""

import numpy as np
import pytest

from mneme.config import IndexConfig
from mneme.index import MemoryStore, NamespaceIndex, matches
from mneme.records import NewMemory

DIM = 16


def unit(rng, n):
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def brute_force(model: dict, query: np.ndarray, k: int, flt=None) -> list[str]:
    ids = [i for i, (vec, meta) in model.items() if matches(meta, flt)]
    scores = np.array([model[i][0] @ query for i in ids])
    return [ids[j] for j in np.argsort(-scores, kind="stable")[:k]]


def test_random_adds_replaces_and_deletes_match_brute_force():
    rng = np.random.default_rng(0)
    index = NamespaceIndex("ns", DIM)
    model: dict[str, tuple[np.ndarray, dict]] = {}
    for step in range(300):
        op = rng.random()
        if op < 0.6 or not model:
            n = int(rng.integers(1, 5))
            ids = [f"m{int(rng.integers(0, 60))}" for _ in range(n)]
            ids = list(dict.fromkeys(ids))
            vecs = unit(rng, len(ids))
            metas = [{"g": int(rng.integers(0, 3))} for _ in ids]
            index.upsert(
                [NewMemory(i, f"text {i} v{step}", m) for i, m in zip(ids, metas, strict=True)],
                vecs,
            )
            for i, v, m in zip(ids, vecs, metas, strict=True):
                model[i] = (v, m)
        else:
            victim = sorted(model)[int(rng.integers(0, len(model)))]
            assert index.delete(victim)
            del model[victim]
        assert len(index) == len(model)
        if step % 10 == 0:
            q = unit(rng, 1)[0]
            for flt in (None, {"g": 1}):
                got = [h.id for h in index.search(q[None], 5, flt)[0]]
                assert got == brute_force(model, q, 5, flt)
    for i, (vec, meta) in model.items():
        stored = index.get(i)
        assert stored is not None and stored.metadata == meta
        np.testing.assert_allclose(index.vector(i), vec, rtol=1e-6)


def test_batched_search_equals_one_by_one():
    rng = np.random.default_rng(1)
    index = NamespaceIndex("ns", DIM)
    index.upsert([NewMemory(str(i), "t") for i in range(100)], unit(rng, 100))
    queries = unit(rng, 20)
    batched = index.search(queries, 7)
    for q, hits in zip(queries, batched, strict=True):
        assert hits == index.search(q[None], 7)[0]


def test_top_k_larger_than_the_namespace_returns_all():
    rng = np.random.default_rng(2)
    index = NamespaceIndex("ns", DIM)
    index.upsert([NewMemory("a", "t"), NewMemory("b", "t")], unit(rng, 2))
    assert len(index.search(unit(rng, 1), 10)[0]) == 2


def test_paging_walks_every_memory_once():
    rng = np.random.default_rng(3)
    index = NamespaceIndex("ns", DIM)
    index.upsert([NewMemory(f"m{i}", "t") for i in range(10)], unit(rng, 10))
    index.delete("m4")
    seen, cursor = [], None
    while True:
        page = index.page(3, cursor)
        seen += [m.id for m in page.memories]
        if page.next_cursor is None:
            break
        cursor = int(page.next_cursor)
    assert seen == [f"m{i}" for i in range(10) if i != 4]


def test_namespaces_never_see_each_other():
    rng = np.random.default_rng(4)
    store = MemoryStore()
    vecs = unit(rng, 2)
    store.upsert("a", [NewMemory("x", "secret of a")], vecs[:1])
    store.upsert("b", [NewMemory("y", "b's note")], vecs[1:])
    hits = store.search("b", vecs[:1], 10, None)[0]
    assert [h.id for h in hits] == ["y"]
    assert store.get("b", "x") is None and not store.delete("b", "x")
    assert store.search("nobody", vecs[:1], 3, None) == [[]]


@pytest.mark.parametrize(
    ("meta", "flt", "ok"),
    [
        ({"a": 1}, None, True),
        ({"a": 1}, {"a": 1}, True),
        ({"a": 1}, {"a": 2}, False),
        ({}, {"a": None}, False),
        ({"a": None}, {"a": None}, True),
        ({"a": [1]}, {"a": [1]}, True),
    ],
)
def test_equality_filter(meta, flt, ok):
    assert matches(meta, flt) is ok


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_namespace_becomes_approximate_at_its_size_threshold_and_keeps_its_ids(kind):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    config = IndexConfig(kind=kind, min_size=200, rebuild_tombstone_share=0.1)
    index = NamespaceIndex("ns", 32, config)
    index.upsert([NewMemory(f"m{i}", f"t{i}") for i in range(199)], vectors[:199])
    assert index.kind == "flat"
    index.upsert([NewMemory(f"m{i}", f"t{i}") for i in range(199, 400)], vectors[199:])
    assert index.kind == kind
    for i in range(0, 100):  # past the tombstone share: HNSW rebuilds, IVF removes
        assert index.delete(f"m{i}")
    assert index._index.ntotal < 400 or kind == "hnsw" and index._tombstones
    hits = index.search(vectors[:150], 1)
    assert all(row[0].id not in {f"m{i}" for i in range(100)} for row in hits)
    found = sum(row[0].id == f"m{i}" for i, row in enumerate(hits) if i >= 100)
    assert found >= 48  # its own vector comes back first (recall on 50 queries)
    restored = NamespaceIndex.from_state(index.state(), config)
    assert restored.kind == kind and len(restored) == 300
    assert restored.get("m250").text == "t250"
