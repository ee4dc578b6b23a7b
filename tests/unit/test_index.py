"""The FAISS store against a brute-force model of the expected state."""

import dataclasses

import numpy as np
import pytest

from mneme import index as index_module
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
    index.settle()  # the rebuild runs in a thread
    assert index.kind == kind
    for i in range(0, 100):  # past the tombstone share: HNSW rebuilds, IVF removes
        assert index.delete(f"m{i}")
    index.settle()
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


class FakeIndexOutOfMemory:
    """A FAISS index whose `failing` method raises MemoryError: a fault FAISS will not
    produce on demand. Everything else is the real index's."""

    def __init__(self, real, failing: str):
        self.real, self.failing = real, failing

    def __getattr__(self, name):
        if name == self.failing:

            def fail(*args, **kwargs):
                raise MemoryError("injected")

            return fail
        return getattr(self.real, name)


@pytest.mark.parametrize("config", SEARCH_PATHS, ids=["faiss", "torch"])
def test_a_replace_whose_add_fails_changes_nothing_and_can_be_applied_again(config):
    """A replica applies a logged write again after a failure (catch_up): the first try
    must leave the old memory whole, not half-removed, and the torch mirror take the same
    labels again."""
    rng = np.random.default_rng(9)
    index = NamespaceIndex("a", DIM, config)
    old, new = unit(rng, 1), unit(rng, 1)
    index.upsert([NewMemory("m1", "old")], old)
    index.upsert([NewMemory(f"o{i}", "t") for i in range(10)], unit(rng, 10))  # no compaction
    real = index._index
    index._index = FakeIndexOutOfMemory(real, "add_with_ids")
    with pytest.raises(MemoryError):
        index.upsert([NewMemory("m1", "new")], new)
    index._index = real
    assert index.get("m1").text == "old"
    assert [h.id for h in index.search(old, 1, None)[0]] == ["m1"]
    index.upsert([NewMemory("m1", "new")], new)  # the retry
    index.upsert([NewMemory("m2", "other")], unit(rng, 1))  # and the writes after it
    assert index.get("m1").text == "new" and index.page(10, None).memories[0].text == "new"
    assert [m.id for m in index.page(20, None).memories][::11] == ["m1", "m2"]
    assert [h.id for h in index.search(new, 1, None)[0]] == ["m1"]


@pytest.mark.parametrize("config", SEARCH_PATHS, ids=["faiss", "torch"])
def test_a_replace_whose_old_vector_cannot_be_removed_stands_and_never_returns_it(config):
    """The new vector is in and the maps say so: the old one is a tombstone that searches
    and snapshots account for, removed with the next removal that works."""
    rng = np.random.default_rng(10)
    index = NamespaceIndex("a", DIM, config)
    vectors = unit(rng, 4)
    index.upsert([NewMemory(f"m{i}", f"t{i}") for i in range(3)], vectors[:3])
    real = index._index
    index._index = FakeIndexOutOfMemory(real, "remove_ids")
    index.upsert([NewMemory("m0", "replaced")], vectors[3:])  # acknowledged, not a failure
    index._index = real
    assert index.get("m0").text == "replaced"
    for path in (index, NamespaceIndex.from_state(index.state(), config)):
        hits = path.search(vectors[:1], 3, None)[0]  # the old m0 vector is the best match
        assert sorted(h.id for h in hits) == ["m0", "m1", "m2"]
        assert next(h for h in hits if h.id == "m0").text == "replaced"
    index.delete("m1")  # this removal takes the tombstone out too
    assert index._index.ntotal == 2 and not index._tombstones


def test_a_mirror_that_cannot_remove_is_dropped_and_the_snapshot_still_loads():
    """FAISS removed the vector but the torch mirror could not (out of device memory):
    FAISS searches from then on, and no tombstone names a vector FAISS no longer holds."""
    rng = np.random.default_rng(17)
    config = IndexConfig(flat_device="cpu")
    index = NamespaceIndex("a", DIM, config)
    vectors = unit(rng, 4)
    index.upsert([NewMemory(f"m{i}", f"t{i}") for i in range(3)], vectors[:3])
    index._mirror = FakeIndexOutOfMemory(index._mirror, "remove")
    index.upsert([NewMemory("m0", "replaced")], vectors[3:])
    assert index._mirror is None and not index._tombstones
    restored = NamespaceIndex.from_state(index.state(), config)
    for path in (index, restored):
        hits = path.search(vectors[:1], 3, None)[0]
        assert sorted(h.id for h in hits) == ["m0", "m1", "m2"]


def test_a_failed_rebuild_keeps_the_index_and_the_write():
    rng = np.random.default_rng(11)
    index = NamespaceIndex("a", DIM, IndexConfig(kind="hnsw", min_size=20))
    vectors = unit(rng, 22)
    index.upsert([NewMemory(f"m{i}", "t") for i in range(19)], vectors[:19])
    real_new_index = index_module.new_faiss_index

    def fake_new_index_out_of_memory(*args):  # a fault FAISS will not produce on demand
        raise MemoryError("injected")

    index_module.new_faiss_index = fake_new_index_out_of_memory
    try:
        index.upsert([NewMemory("m19", "t")], vectors[19:20])  # reaches min_size
        index.settle()
    finally:
        index_module.new_faiss_index = real_new_index
    assert index.kind == "flat" and index.get("m19") is not None
    index.upsert([NewMemory("m20", "t")], vectors[20:21])
    assert index._rebuilding is None  # not at once: every write would copy every vector
    index._next_rebuild_at = 0.0  # REBUILD_RETRY_S later
    index.upsert([NewMemory("m21", "t")], vectors[21:])  # tried again
    index.settle()
    assert index.kind == "hnsw" and len(index) == 22


def test_paging_does_not_meet_a_replaced_memory_again():
    rng = np.random.default_rng(12)
    index = NamespaceIndex("a", DIM)
    index.upsert([NewMemory(f"m{i}", "t") for i in range(6)], unit(rng, 6))
    first = index.page(3, None)
    index.upsert([NewMemory("m1", "again")], unit(rng, 1))  # a retried add, say
    index.delete("m4")
    rest = index.page(3, int(first.next_cursor))
    assert [m.id for m in first.memories + rest.memories] == ["m0", "m1", "m2", "m3", "m5"]
    assert rest.next_cursor is None
    restored = NamespaceIndex.from_state(index.state())
    assert [m.id for m in restored.page(10, None).memories] == ["m0", "m1", "m2", "m3", "m5"]


def test_a_snapshot_from_before_positions_lists_in_write_order():
    rng = np.random.default_rng(13)
    index = NamespaceIndex("a", DIM)
    index.upsert([NewMemory(f"m{i}", "t") for i in range(4)], unit(rng, 4))
    state = index.state()
    state["memories"] = [dataclasses.replace(m, position=-1) for m in state["memories"]]
    restored = NamespaceIndex.from_state(state)
    page = restored.page(2, None)
    assert [m.id for m in page.memories] == ["m0", "m1"]
    assert [m.id for m in restored.page(2, int(page.next_cursor)).memories] == ["m2", "m3"]


def test_equal_scores_come_back_in_write_order_whatever_the_k():
    """The same text under several ids: a query's hits must not depend on the k of the
    batch it was searched in (VectorSearch searches a group with its largest top_k)."""
    rng = np.random.default_rng(14)
    index = NamespaceIndex("a", DIM)
    index.upsert([NewMemory(f"o{i}", "t") for i in range(50)], unit(rng, 50))
    query = unit(rng, 1)
    index.upsert([NewMemory(f"dup{i}", "t") for i in range(6)], np.repeat(query, 6, axis=0))
    want = [f"dup{i}" for i in range(6)]
    for k in (1, 2, 3, 5, 6, 10):
        assert [h.id for h in index.search(query, k)[0]][: min(k, 6)] == want[:k]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_selective_filter_on_an_approximate_index_finds_top_k(kind):
    """A filter allowing few memories: the beam (HNSW) or the probed lists (IVF) meet few
    of them, so they are scored exactly; one allowing many widens the search instead."""
    rng = np.random.default_rng(15)
    config = IndexConfig(kind=kind, min_size=100, ivf_nprobe=4, hnsw_ef_search=16)
    index = NamespaceIndex("a", DIM, config)
    n = 6000
    groups = [{"g": "rare" if i % 500 == 0 else ("some" if i % 20 == 0 else "x")} for i in range(n)]
    vectors = unit(rng, n)
    index.upsert([NewMemory(f"m{i}", "t", groups[i]) for i in range(n)], vectors)
    index.settle()
    assert index.kind == kind
    model = {f"m{i}": (vectors[i], groups[i]) for i in range(n)}
    queries = unit(rng, 8)
    rare = index.search(queries, 10, {"g": "rare"})
    for query, hits in zip(queries, rare, strict=True):
        assert [h.id for h in hits] == brute_force(model, query, 10, {"g": "rare"})
    original = index_module.EXACT_FILTER_MAX
    index_module.EXACT_FILTER_MAX = 0  # the widened search, as for a filter allowing many
    try:
        some = index.search(queries, 10, {"g": "some"})
    finally:
        index_module.EXACT_FILTER_MAX = original
    assert [len(hits) for hits in some] == [10] * len(queries)
    assert all(h.metadata == {"g": "some"} for hits in some for h in hits)


@pytest.mark.parametrize("new", [50, 150], ids=["caught-up-at-the-swap", "in-a-round-first"])
@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_writes_made_while_a_rebuild_runs_are_in_the_index_it_swaps_in(kind, new):
    """The rebuild runs in a thread while the old index serves: the adds, replaces and
    deletes made meanwhile must all hold in the index swapped in (more than
    SWAP_CATCH_UP_MAX of them are added in the builder thread first)."""
    import threading

    rng = np.random.default_rng(16)
    config = IndexConfig(kind=kind, min_size=300)
    index = NamespaceIndex("a", DIM, config)
    vectors = unit(rng, 500)
    model = {}

    def add(ids, rows):
        index.upsert([NewMemory(f"m{i}", "t") for i in ids], vectors[rows])
        model.update({f"m{i}": (vectors[r], {}) for i, r in zip(ids, rows, strict=True)})

    add(range(299), range(299))
    gate, real_build = threading.Event(), index_module.build_index

    def build_held_until_the_gate_opens(*args):  # timing only: the build itself is real
        gate.wait(10)
        return real_build(*args)

    index_module.build_index = build_held_until_the_gate_opens
    try:
        add([299], [299])  # reaches min_size: the rebuild starts, held
        add(range(300, 300 + new), range(300, 300 + new))  # meanwhile: new memories,
        add([5, 6], [450, 451])  # replaced ones,
        for i in (7, 8, 310):  # and deleted ones, old and new
            index.delete(f"m{i}")
            del model[f"m{i}"]
        assert index.kind == "flat"  # the old index serves meanwhile
        gate.set()
        index.settle()
    finally:
        index_module.build_index = real_build
    assert index.kind == kind and len(index) == len(model) == 297 + new
    assert index._index.ntotal - len(index._tombstones) == 297 + new
    queries = vectors[[5, 7, 310, 320, 450]]
    found = [[h.id for h in row] for row in index.search(queries, 3)]
    assert found[3][0] == "m320" and found[4][0] == "m5"  # a new memory, a replaced one
    assert found[0][0] != "m5"  # its old vector is gone
    dead = {"m7", "m8", "m310"}
    assert not dead & {hit for row in found for hit in row}
    restored = NamespaceIndex.from_state(index.state(), config)
    assert restored.kind == kind and len(restored) == 297 + new
