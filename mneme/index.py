"""FAISS-backed memory store: one exact inner-product index per namespace.

Pure Python + FAISS (no Ray), so it is unit-tested directly. Vectors are L2-normalised by the
Embedder, so inner product is cosine similarity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from mneme.records import MemoryPage, NewMemory, SearchHit, StoredMemory


def matches(metadata: dict[str, Any], flt: dict[str, Any] | None) -> bool:
    """Equality filter: every key of `flt` is present in `metadata` with an equal value."""
    if not flt:
        return True
    return all(key in metadata and metadata[key] == value for key, value in flt.items())


class NamespaceIndex:
    """Memories of one namespace: an `IndexIDMap2(IndexFlatIP)` keyed by a private int label."""

    def __init__(self, namespace: str, dim: int):
        self.namespace = namespace
        self.dim = dim
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._by_id: dict[str, StoredMemory] = {}
        self._by_seq: dict[int, StoredMemory] = {}
        self._next_seq = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def state(self) -> dict[str, Any]:
        """The index and its label -> memory map together: restored as one, ids never drift."""
        return {
            "namespace": self.namespace,
            "dim": self.dim,
            "index": faiss.serialize_index(self._index),
            "memories": list(self._by_seq.values()),
            "next_seq": self._next_seq,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> NamespaceIndex:
        index = cls(state["namespace"], state["dim"])
        index._index = faiss.deserialize_index(state["index"])
        for stored in state["memories"]:
            index._by_id[stored.id] = stored
            index._by_seq[stored.seq] = stored
        index._next_seq = state["next_seq"]
        if index._index.ntotal != len(index._by_seq):
            raise ValueError(
                f"snapshot of {index.namespace!r}: {index._index.ntotal} vectors "
                f"but {len(index._by_seq)} memories"
            )
        return index

    def upsert(self, items: Sequence[NewMemory], vectors: np.ndarray) -> list[str]:
        """Add items; an item whose id exists replaces it (so a retried add stores one copy)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(items), self.dim)
        replaced = [self._by_id[item.id].seq for item in items if item.id in self._by_id]
        if replaced:
            self._index.remove_ids(np.asarray(replaced, dtype=np.int64))
            for seq in replaced:
                del self._by_seq[seq]
        seqs = np.arange(self._next_seq, self._next_seq + len(items), dtype=np.int64)
        self._next_seq += len(items)
        self._index.add_with_ids(vectors, seqs)
        for item, seq in zip(items, seqs.tolist(), strict=True):
            stored = StoredMemory(item.id, self.namespace, item.text, dict(item.metadata), seq)
            self._by_id[item.id] = stored
            self._by_seq[seq] = stored
        return [item.id for item in items]

    def delete(self, memory_id: str) -> bool:
        stored = self._by_id.pop(memory_id, None)
        if stored is None:
            return False
        del self._by_seq[stored.seq]
        self._index.remove_ids(np.asarray([stored.seq], dtype=np.int64))
        return True

    def get(self, memory_id: str) -> StoredMemory | None:
        return self._by_id.get(memory_id)

    def vector(self, memory_id: str) -> np.ndarray:
        return self._index.reconstruct(self._by_id[memory_id].seq)

    def page(self, limit: int, cursor: int | None) -> MemoryPage:
        """Memories in write order after `cursor` (an opaque seq from the previous page)."""
        after = -1 if cursor is None else cursor
        seqs = sorted(seq for seq in self._by_seq if seq > after)
        chosen = [self._by_seq[seq] for seq in seqs[:limit]]
        more = len(seqs) > limit
        return MemoryPage(chosen, str(chosen[-1].seq) if more and chosen else None)

    def search(
        self, queries: np.ndarray, top_k: int, flt: dict[str, Any] | None = None
    ) -> list[list[SearchHit]]:
        """Exact top-k for each row of `queries` (one FAISS call for the whole batch)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        params = None
        if flt:
            allowed = [m.seq for m in self._by_seq.values() if matches(m.metadata, flt)]
            if not allowed:
                return [[] for _ in range(len(queries))]
            params = faiss.SearchParameters(
                sel=faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            )
        k = min(top_k, len(self._by_seq))
        if k == 0:
            return [[] for _ in range(len(queries))]
        scores, labels = self._index.search(queries, k, params=params)
        results = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            hits = []
            for score, label in zip(row_scores.tolist(), row_labels.tolist(), strict=True):
                if label < 0:
                    continue
                m = self._by_seq[label]
                hits.append(SearchHit(m.id, m.text, float(score), dict(m.metadata)))
            results.append(hits)
        return results


class MemoryStore:
    """All namespaces of one VectorSearch replica; a namespace's index is made on first add."""

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self._namespaces: dict[str, NamespaceIndex] = {}

    def state(self) -> dict[str, Any]:
        return {"dim": self.dim, "namespaces": [i.state() for i in self._namespaces.values()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MemoryStore:
        store = cls(state["dim"])
        for ns_state in state["namespaces"]:
            index = NamespaceIndex.from_state(ns_state)
            store._namespaces[index.namespace] = index
        return store

    def namespace(self, name: str) -> NamespaceIndex | None:
        return self._namespaces.get(name)

    def upsert(self, namespace: str, items: Sequence[NewMemory], vectors: np.ndarray) -> list[str]:
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.dim is None:
            self.dim = int(vectors.shape[-1])
        index = self._namespaces.get(namespace)
        if index is None:
            index = self._namespaces[namespace] = NamespaceIndex(namespace, self.dim)
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

    def stats(self) -> dict[str, int]:
        return {
            "namespaces": len(self._namespaces),
            "memories": sum(len(i) for i in self._namespaces.values()),
        }
