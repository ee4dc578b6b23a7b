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


# flat_device: the torch search path (the GPU one where faiss-gpu is missing), here on CPU
SEARCH_PATHS = [IndexConfig(), IndexConfig(flat_device="cpu")]


@pytest.mark.parametrize("config", SEARCH_PATHS, ids=["faiss", "torch"])
def test_random_adds_replaces_and_deletes_match_brute_force(config):
    rng = np.random.default_rng(0)
    index = NamespaceIndex("ns", DIM, config)
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


@pytest.mark.parametrize("config", SEARCH_PATHS, ids=["faiss", "torch"])
def test_batched_search_equals_one_by_one(config):
    rng = np.random.default_rng(1)
    index = NamespaceIndex("ns", DIM, config)
    index.upsert([NewMemory(str(i), "t") for i in range(100)], unit(rng, 100))
    queries = unit(rng, 20)
    batched = index.search(queries, 7)
    for q, hits in zip(queries, batched, strict=True):
        alone = index.search(q[None], 7)[0]
        assert [h.id for h in hits] == [h.id for h in alone]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in alone], atol=1e-6)


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
        # JSON's equality, not Python's: true is not 1
        ({"a": 1}, {"a": True}, False),
        ({"a": True}, {"a": 1.0}, False),
        ({"a": False}, {"a": 0}, False),
        ({"a": True}, {"a": True}, True),
        ({"a": [True, {"b": 1}]}, {"a": [1, {"b": 1}]}, False),
        ({"a": {"b": [False]}}, {"a": {"b": [False]}}, True),
        ({"a": 1}, {"a": 1.0}, True),
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


def test_the_torch_path_survives_a_snapshot_and_agrees_with_faiss():
    rng = np.random.default_rng(5)
    faiss_index = NamespaceIndex("ns", DIM)
    items = [NewMemory(f"m{i}", "t", {"g": i % 3}) for i in range(500)]
    vectors = unit(rng, 500)
    faiss_index.upsert(items, vectors)
    for i in range(0, 500, 3):
        faiss_index.delete(f"m{i}")
    restored = NamespaceIndex.from_state(faiss_index.state(), IndexConfig(flat_device="cpu"))
    queries = unit(rng, 32)
    for flt in (None, {"g": 1}):
        want = [[h.id for h in hits] for hits in faiss_index.search(queries, 10, flt)]
        got = [[h.id for h in hits] for hits in restored.search(queries, 10, flt)]
        assert got == want


def test_torch_flat_keeps_labels_in_write_order_and_compacts():
    from mneme.torch_search import TorchFlat

    rng = np.random.default_rng(6)
    flat = TorchFlat(DIM)
    vectors = unit(rng, 3000)
    for start in range(0, 3000, 700):  # grows past its first capacity
        flat.add(vectors[start : start + 700], np.arange(start, min(start + 700, 3000)))
    with pytest.raises(ValueError, match="increasing"):
        flat.add(vectors[:1], np.array([5]))
    flat.remove(np.arange(0, 3000, 2))  # half dead: compacted
    flat.remove([1, 99_999])  # an unknown label is ignored
    assert len(flat) == 1499
    scores, labels = flat.search(vectors[:4], 3000)
    assert set(labels[0][labels[0] >= 0]) == set(range(3, 3000, 2))  # -1 pads a dead row
    assert labels[0][0] == 3 or scores[0][0] >= vectors[0] @ vectors[3] - 1e-6
    _, allowed = flat.search(vectors[:2], 5, allowed=np.array([7, 9, 10]))
    assert [sorted(row[row >= 0].tolist()) for row in allowed] == [[7, 9], [7, 9]]


def test_a_replace_whose_add_fails_changes_nothing_and_can_be_applied_again():
    """A replica applies a logged write again after a failure (catch_up): the first try
    must leave the old memory whole, not half-removed."""
    rng = np.random.default_rng(9)
    index = NamespaceIndex("a", DIM)
    old, new = unit(rng, 1), unit(rng, 1)
    index.upsert([NewMemory("m1", "old")], old)
    real = index._index

    class FakeIndexOutOfMemory:  # a fault FAISS will not produce on demand
        def __getattr__(self, name):
            return getattr(real, name)

        def add_with_ids(self, *args):
            raise MemoryError("injected")

    index._index = FakeIndexOutOfMemory()
    with pytest.raises(MemoryError):
        index.upsert([NewMemory("m1", "new")], new)
    index._index = real
    assert index.get("m1").text == "old"
    assert [h.id for h in index.search(old, 1, None)[0]] == ["m1"]
    index.upsert([NewMemory("m1", "new")], new)  # the retry
    assert index.get("m1").text == "new" and index.page(10, None).memories[0].text == "new"
    assert len(index.page(10, None).memories) == 1
