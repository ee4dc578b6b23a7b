"""FAISS-backed memory store: one exact inner-product index per namespace.

Pure Python + FAISS (no Ray), so it is unit-tested directly. Vectors are L2-normalised by the
Embedder, so inner product is cosine similarity.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np

from mneme.config import IndexConfig
from mneme.records import MemoryPage, NewMemory, SearchHit, StoredMemory

logger = logging.getLogger(__name__)

# A filtered search of an approximate index that allows at most this many memories scores
# them all (exactly), which costs less than a beam wide enough to meet k of them.
EXACT_FILTER_MAX = 16_384

# Rebuilds run here, one at a time, beside the replica's event loop (FAISS releases the GIL).
_BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mneme-index-build")
# The writes made while an index is rebuilt are added to it in the builder thread, in rounds,
# until at most this many are left: those are added on the event loop, at the swap.
SWAP_CATCH_UP_MAX = 64
REBUILD_RETRY_S = 60.0  # after a rebuild failed (out of memory), before the next one starts

# One search of a batch: (namespace, query rows, top_k, metadata filter or None).
SearchGroup = tuple[str, np.ndarray, int, dict[str, Any] | None]


def matches(metadata: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    """Equality filter: every key of `flt` is present in `metadata` with an equal value."""
    if not flt:
        return True
    return all(key in metadata and json_equal(metadata[key], value) for key, value in flt.items())


def checked_vectors(items: Sequence[NewMemory], vectors: Any, dim: int | None) -> np.ndarray:
    """The vectors of an upsert as float32 rows, one per item; a ValueError for what no
    index could take, raised before anything is logged or changed."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(items):
        raise ValueError(f"{len(items)} items but vectors of shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(
            f"vectors of {vectors.shape[1]} dimensions for a store of {dim}: another "
            "embedding model needs its own vector_search.storage.data_dir"
        )
    if not np.isfinite(vectors).all():
        raise ValueError("vectors must be finite")
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise ValueError("the same id twice in one upsert")
    return vectors


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: `true` is not `1` (as it is in Python); `1` is `1.0`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(json_equal, a, b))
    return a == b


def new_faiss_index(dim: int, kind: str, config: IndexConfig, size: int = 0) -> faiss.Index:
    """An inner-product index keyed by our labels: `IndexIDMap2` over flat or HNSW, or IVF
    (which keeps labels itself)."""
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = config.hnsw_ef_construction
        inner.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivf":  # labels live in its lists: no IDMap (whose removal it breaks)
        # 4 sqrt(n) lists, each trained on at least 39 points (FAISS's own rule of thumb)
        nlist = max(1, min(65_536, int(4 * np.sqrt(max(size, 1))), size // 39))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.nprobe = config.ivf_nprobe
        ivf.cp.max_points_per_centroid = 64  # k-means on a sample: 1M vectors train in ~a minute
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct + remove by label
        return ivf
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    return faiss.IndexIDMap2(inner)


def build_index(dim: int, kind: str, config: IndexConfig, vectors, labels) -> faiss.Index:
    """A fresh index of `kind` holding `vectors` under `labels` (touches nothing shared)."""
    index = new_faiss_index(dim, kind, config, len(labels))
    if kind == "ivf":
        index.train(vectors)
    index.add_with_ids(vectors, labels)
    return index


def caught_up(index: faiss.Index, writes: list[tuple[np.ndarray, np.ndarray]]) -> faiss.Index:
    """`index` with the (vectors, labels) written since it was started added."""
    for vectors, labels in writes:
        index.add_with_ids(vectors, labels)
    return index


@dataclasses.dataclass
class _Rebuild:
    """A rebuild in progress: the new index (built, or caught up, in the builder thread),
    the writes it still lacks, and the labels that died since it began."""

    kind: str
    index: Future  # of the new faiss.Index
    written: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)
    removed: set[int] = dataclasses.field(default_factory=set)


class NamespaceIndex:
    """Memories of one namespace: FAISS vectors keyed by a private int label (`seq`).

    Flat (exact) until `config.min_size` memories when `config.kind` is hnsw or ivf, then
    rebuilt as that kind. HNSW cannot remove vectors, so its deletes are tombstones that
    searches skip, until they pass `rebuild_tombstone_share` and the index is rebuilt.
    A rebuild runs in a thread while the old index serves; the next call after it ends
    brings it up to date (the writes made meanwhile) and swaps it in.
    """

    def __init__(self, namespace: str, dim: int, config: IndexConfig | None = None):
        self.namespace = namespace
        self.dim = dim
        self.config = config or IndexConfig()
        self.kind = "flat"
        self._index = new_faiss_index(dim, "flat", self.config)
        self._by_id: dict[str, StoredMemory] = {}
        self._by_seq: dict[int, StoredMemory] = {}
        self._by_position: dict[int, StoredMemory] = {}
        self._positions: list[int] = []  # ascending: the listing order
        self._tombstones: set[int] = set()  # labels still in the index of no live memory
        self._next_seq = 0
        self._mirror = self._new_mirror()
        self._rebuilding: _Rebuild | None = None
        self._next_rebuild_at = 0.0  # monotonic time; later after a failed one

    def _new_mirror(self):
        """The torch copy of a flat index that searches run on (config.flat_device), or None."""
        if self.config.flat_device is None or self.kind != "flat":
            return None
        from mneme.torch_search import TorchFlat

        mirror = TorchFlat(self.dim, self.config.flat_device)
        if self._by_seq:
            mirror.add(*self._live_vectors())
        return mirror

    def __len__(self) -> int:
        return len(self._by_id)

    def state(self) -> dict[str, Any]:
        """The index and its label -> memory map together: restored as one, ids never drift."""
        return {
            "namespace": self.namespace,
            "dim": self.dim,
            "kind": self.kind,
            "index": faiss.serialize_index(self._index),
            "memories": list(self._by_seq.values()),
            "tombstones": sorted(self._tombstones),
            "next_seq": self._next_seq,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], config: IndexConfig | None = None) -> NamespaceIndex:
        index = cls(state["namespace"], state["dim"], config)
        index.kind = state.get("kind", "flat")
        index._index = faiss.deserialize_index(state["index"])
        for stored in state["memories"]:
            if stored.position < 0:  # a snapshot older than positions listed by seq
                stored = dataclasses.replace(stored, position=stored.seq)
            index._place(stored)
            index._positions.append(stored.position)
        index._positions.sort()
        index._tombstones = set(state.get("tombstones", ()))
        index._next_seq = state["next_seq"]
        index._mirror = index._new_mirror()
        if index._index.ntotal != len(index._by_seq) + len(index._tombstones):
            raise ValueError(
                f"snapshot of {index.namespace!r}: {index._index.ntotal} vectors "
                f"but {len(index._by_seq)} memories"
            )
        return index

    def _place(self, stored: StoredMemory) -> None:
        self._by_id[stored.id] = stored
        self._by_seq[stored.seq] = stored
        self._by_position[stored.position] = stored

    def _remove(self, labels: list[int]) -> None:
        """Take dead labels out of the index. HNSW cannot: they stay as tombstones that
        searches skip until they pass `rebuild_tombstone_share` and the index is rebuilt. A
        removal that fails (out of memory) leaves tombstones too, tried again with the next
        one: the write that killed them has happened and is not undone."""
        self._tombstones.update(labels)
        if self._rebuilding is not None:
            self._rebuilding.removed.update(labels)
        if self.kind == "hnsw":
            if len(self._tombstones) > self.config.rebuild_tombstone_share * self._index.ntotal:
                self._start_rebuild(self.kind)
            return
        dead = np.asarray(sorted(self._tombstones), dtype=np.int64)
        try:
            self._index.remove_ids(dead)
        except Exception:
            # the mirror holds no tombstones: FAISS (which skips them) searches from now on
            logger.exception("namespace %r: %d dead vectors kept", self.namespace, len(dead))
            self._mirror = None
            return
        self._tombstones.clear()
        if self._mirror is not None:
            try:
                self._mirror.remove(dead)
            except Exception:  # FAISS searches from now on, until the replica restarts
                logger.exception("namespace %r: the torch mirror is dropped", self.namespace)
                self._mirror = None

    def _live_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(sorted(self._by_seq), dtype=np.int64)
        if len(labels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32), labels
        return self._index.reconstruct_batch(labels).astype(np.float32), labels  # one call

    def _start_rebuild(self, kind: str) -> None:
        """A fresh index of `kind` over the live vectors (same labels: nothing drifts), built
        in a thread. At 1M memories HNSW takes minutes: on the event loop it would hold up
        every call of the replica, past Serve's health check."""
        if self._rebuilding is not None or time.monotonic() < self._next_rebuild_at:
            return
        vectors, labels = self._live_vectors()
        build = _BUILDER.submit(build_index, self.dim, kind, self.config, vectors, labels)
        self._rebuilding = _Rebuild(kind, build)

    def finish_rebuild(self, wait: bool = False) -> None:
        """Swaps in a rebuilt index once built and caught up with what was written meanwhile
        (in rounds in the builder thread, the last few on the loop). A rebuild that failed
        (out of memory) leaves the index as it was, tried again `REBUILD_RETRY_S` later."""
        rebuild = self._rebuilding
        while rebuild is not None and (wait or rebuild.index.done()):
            try:
                index = rebuild.index.result()
                written, rebuild.written = rebuild.written, []
                if sum(len(labels) for _, labels in written) > SWAP_CATCH_UP_MAX:
                    rebuild.index = _BUILDER.submit(caught_up, index, written)
                    continue
                caught_up(index, written)
            except Exception:
                logger.exception(
                    "namespace %r: rebuilding as %s failed", self.namespace, rebuild.kind
                )
                self._rebuilding, self._next_rebuild_at = None, time.monotonic() + REBUILD_RETRY_S
                return
            self._rebuilding = None
            # an approximate kind: the torch mirror only ever serves flat namespaces
            self._index, self.kind, self._tombstones = index, rebuild.kind, set()
            self._mirror = None
            if rebuild.removed:
                self._remove(sorted(rebuild.removed))
            return

    def settle(self) -> None:
        """Waits for a rebuild in progress and swaps it in (tests, benchmarks)."""
        self.finish_rebuild(wait=True)

    def _add_vectors(self, vectors: np.ndarray, seqs: np.ndarray) -> None:
        """Into FAISS and the mirror, or neither."""
        if self._mirror is not None:
            self._mirror.add(vectors, seqs)
        try:
            self._index.add_with_ids(vectors, seqs)
        except BaseException:
            if self._mirror is not None:
                self._mirror.drop_last(len(seqs))
            raise

    def upsert(self, items: Sequence[NewMemory], vectors: np.ndarray) -> list[str]:
        """Add items; an item whose id exists replaces it (so a retried add stores one copy)
        and keeps its place in the listing. The new vectors go in first: if that fails (out of
        memory), nothing changed, and the write can be applied again. What may fail after it
        (removing replaced vectors, a rebuild as `kind`) is tried again later."""
        self.finish_rebuild()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(items), self.dim)
        seqs = np.arange(self._next_seq, self._next_seq + len(items), dtype=np.int64)
        self._add_vectors(vectors, seqs)
        self._next_seq += len(items)
        if self._rebuilding is not None:  # for the index being rebuilt too
            self._rebuilding.written.append((vectors.copy(), seqs))
        replaced = []
        for item, seq in zip(items, seqs.tolist(), strict=True):
            old = self._by_id.get(item.id)
            if old is None:
                self._positions.append(seq)  # the largest yet: seqs only grow
            else:
                replaced.append(old.seq)
                del self._by_seq[old.seq]
            position = seq if old is None else old.position
            metadata = dict(item.metadata)
            self._place(StoredMemory(item.id, self.namespace, item.text, metadata, seq, position))
        if replaced:
            self._remove(replaced)
        if self.kind == "flat" and self.config.kind != "flat":
            if len(self._by_seq) >= self.config.min_size:
                self._start_rebuild(self.config.kind)
        return [item.id for item in items]

    def delete(self, memory_id: str) -> bool:
        self.finish_rebuild()
        stored = self._by_id.pop(memory_id, None)
        if stored is None:
            return False
        del self._by_seq[stored.seq]
        del self._by_position[stored.position]
        del self._positions[bisect.bisect_left(self._positions, stored.position)]
        self._remove([stored.seq])
        return True

    def get(self, memory_id: str) -> StoredMemory | None:
        return self._by_id.get(memory_id)

    def _search_params(self, selector, k: int, widen: float) -> faiss.SearchParameters | None:
        """`widen`: how many times the memories a search may return are outnumbered by those
        it may meet (a filter): the beam or the lists probed grow as much, to still find k."""
        if self.kind == "hnsw":
            ef = max(self.config.hnsw_ef_search, k) * widen
            params = faiss.SearchParametersHNSW(efSearch=int(min(ef, self._index.ntotal)))
        elif self.kind == "ivf":
            nprobe = min(self.config.ivf_nprobe * widen, self._index.nlist)
            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        elif selector is None:
            return None
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
            params.selector = selector  # keep it alive as long as the params
        return params

    def vector(self, memory_id: str) -> np.ndarray:
        return self._index.reconstruct(self._by_id[memory_id].seq)

    def page(self, limit: int, cursor: int | None) -> MemoryPage:
        """Memories in the order their ids were first written, after `cursor` (an opaque
        position from the previous page)."""
        start = bisect.bisect_right(self._positions, -1 if cursor is None else cursor)
        chosen = [self._by_position[p] for p in self._positions[start : start + limit]]
        more = len(self._positions) > start + limit
        return MemoryPage(chosen, str(chosen[-1].position) if more and chosen else None)

    def search(
        self, queries: np.ndarray, top_k: int, flt: dict[str, Any] | None = None
    ) -> list[list[SearchHit]]:
        """Top-k for each row of `queries`: one FAISS (or torch) call for the whole batch."""
        self.finish_rebuild()
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = min(top_k, len(self._by_seq))
        allowed = None
        if flt:
            allowed = [m.seq for m in self._by_seq.values() if matches(m.metadata, flt)]
            if not allowed:
                return [[] for _ in range(len(queries))]
        if k == 0:
            return [[] for _ in range(len(queries))]
        if self._mirror is not None:
            scores, labels = self._mirror.search(queries, k, allowed)
        elif allowed is not None and self.kind != "flat" and len(allowed) <= EXACT_FILTER_MAX:
            scores, labels = self._exact_search(queries, k, allowed)
        else:
            scores, labels = self._faiss_search(queries, k, allowed)
        results = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            # best first; equal scores (the same text under two ids) in write order, so
            # that a query's hits do not depend on the k it was searched with in its batch
            found = sorted(
                (-score, label)
                for score, label in zip(row_scores.tolist(), row_labels.tolist(), strict=True)
                if label >= 0
            )
            hits = []
            for negative_score, label in found:
                m = self._by_seq[label]
                hits.append(SearchHit(m.id, m.text, -float(negative_score), dict(m.metadata)))
            results.append(hits)
        return results

    def _exact_search(
        self, queries: np.ndarray, k: int, allowed: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (unordered) among `allowed` by brute force: an approximate index's beam or
        probed lists meet only part of a namespace, so few of a selective filter's memories."""
        labels = np.asarray(allowed, dtype=np.int64)
        scores = queries @ self._index.reconstruct_batch(labels).T
        k = min(k, len(labels))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return np.take_along_axis(scores, top, axis=1), labels[top]

    def _faiss_search(
        self, queries: np.ndarray, k: int, allowed: list[int] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        selector, widen = None, 1.0
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            widen = self._index.ntotal / len(allowed)
        elif self._tombstones:
            dead = faiss.IDSelectorBatch(np.asarray(sorted(self._tombstones), dtype=np.int64))
            selector = faiss.IDSelectorNot(dead)
            selector.base = dead  # keep it alive as long as the selector
            widen = self._index.ntotal / len(self._by_seq)
        params = self._search_params(selector, k, widen)
        return self._index.search(queries, k, params=params)


class MemoryStore:
    """All namespaces of one VectorSearch replica; a namespace's index is made on first add."""

    def __init__(self, dim: int | None = None, index_config: IndexConfig | None = None):
        self.dim = dim
        self.index_config = index_config or IndexConfig()
        self._namespaces: dict[str, NamespaceIndex] = {}

    def state(self) -> dict[str, Any]:
        return {"dim": self.dim, "namespaces": [i.state() for i in self._namespaces.values()]}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], index_config: IndexConfig | None = None
    ) -> MemoryStore:
        store = cls(state["dim"], index_config)
        for ns_state in state["namespaces"]:
            index = NamespaceIndex.from_state(ns_state, store.index_config)
            store._namespaces[index.namespace] = index
        return store

    def namespace(self, name: str) -> NamespaceIndex | None:
        return self._namespaces.get(name)

    def upsert(self, namespace: str, items: Sequence[NewMemory], vectors: np.ndarray) -> list[str]:
        vectors = checked_vectors(items, vectors, self.dim)
        if self.dim is None:
            self.dim = int(vectors.shape[-1])
        index = self._namespaces.get(namespace)
        if index is None:
            index = NamespaceIndex(namespace, self.dim, self.index_config)
            self._namespaces[namespace] = index
        return index.upsert(items, vectors)

    def delete(self, namespace: str, memory_id: str) -> bool:
        index = self._namespaces.get(namespace)
        return index.delete(memory_id) if index else False

    def get(self, namespace: str, memory_id: str) -> StoredMemory | None:
        index = self._namespaces.get(namespace)
        return index.get(memory_id) if index else None

    def page(self, namespace: str, limit: int, cursor: int | None) -> MemoryPage:
        index = self._namespaces.get(namespace)
        return index.page(limit, cursor) if index else MemoryPage([], None)

    def search(
        self, namespace: str, queries: np.ndarray, top_k: int, flt: dict[str, Any] | None
    ) -> list[list[SearchHit]]:
        index = self._namespaces.get(namespace)
        if index is None:
            return [[] for _ in range(len(queries))]
        return index.search(queries, top_k, flt)

    def search_many(self, groups: Sequence[SearchGroup]) -> list[list[list[SearchHit]]]:
        """`search` for each (namespace, queries, top_k, filter) group, in order."""
        return [self.search(*group) for group in groups]

    def finish_rebuilds(self) -> None:
        """Swaps in the indexes rebuilt since (each namespace's next call would)."""
        for index in self._namespaces.values():
            index.finish_rebuild()

    def stats(self) -> dict[str, Any]:
        self.finish_rebuilds()
        kinds: dict[str, int] = {}
        for index in self._namespaces.values():
            kinds[index.kind] = kinds.get(index.kind, 0) + 1
        return {
            "namespaces": len(self._namespaces),
            "memories": sum(len(i) for i in self._namespaces.values()),
            "index_kinds": kinds,
        }
