"""Exact inner-product top-k with torch: the flat search path for a GPU without `faiss-gpu`.

A `TorchFlat` mirrors one flat namespace's vectors on a torch device (fp16 on CUDA, fp32 on
CPU) and answers a batch of queries with one matmul and one topk. Labels are the namespace's
write-ordered seqs, so they arrive sorted: appends are amortised O(1) and a removal is a
binary search plus a mask bit; dead rows are compacted on the device once they pass a share.

No FAISS or Ray here, so the GPU check (`benchmarks/gpu_check.py`) runs it where only torch is.
"""

from __future__ import annotations

import numpy as np
import torch

COMPACT_DEAD_SHARE = 0.2
SCORES_PER_CHUNK = 1 << 28  # 512 MiB of fp16 scores at a time


class TorchFlat:
    def __init__(self, dim: int, device: str = "cpu", dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.dim = dim
        self._vectors = torch.empty((0, dim), dtype=self.dtype, device=self.device)
        self._alive = torch.empty(0, dtype=torch.bool, device=self.device)
        self._labels = np.empty(0, dtype=np.int64)  # ascending
        self._n = 0
        self._dead = 0

    def __len__(self) -> int:
        return self._n - self._dead

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        """Append rows; labels must be larger than every label held (write order)."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) == 0:
            return
        if self._n and labels[0] <= self._labels[self._n - 1]:
            raise ValueError("labels must arrive in increasing order")
        needed = self._n + len(labels)
        if needed > len(self._labels):
            capacity = max(needed, 2 * len(self._labels), 16)
            self._grow(capacity)
        rows = torch.as_tensor(np.asarray(vectors, dtype=np.float32), device=self.device)
        self._vectors[self._n : needed] = rows.to(self.dtype)
        self._alive[self._n : needed] = True
        self._labels[self._n : needed] = labels
        self._n = needed

    def drop_last(self, count: int) -> None:
        """Undo the last `add` of `count` rows (its labels may be added again)."""
        self._alive[self._n - count : self._n] = False
        self._n -= count

    def _grow(self, capacity: int) -> None:
        vectors = torch.empty((capacity, self.dim), dtype=self.dtype, device=self.device)
        vectors[: self._n] = self._vectors[: self._n]
        alive = torch.zeros(capacity, dtype=torch.bool, device=self.device)
        alive[: self._n] = self._alive[: self._n]
        labels = np.empty(capacity, dtype=np.int64)
        labels[: self._n] = self._labels[: self._n]
        self._vectors, self._alive, self._labels = vectors, alive, labels

    def remove(self, labels: list[int] | np.ndarray) -> None:
        held = self._labels[: self._n]
        wanted = np.unique(np.asarray(labels, dtype=np.int64))
        rows = np.searchsorted(held, wanted)
        inside = rows < self._n
        rows = rows[inside][held[rows[inside]] == wanted[inside]]
        if len(rows) == 0:
            return
        index = torch.as_tensor(rows, device=self.device)
        self._dead += int(self._alive[index].sum())
        self._alive[index] = False
        if self._dead > COMPACT_DEAD_SHARE * self._n:
            self._compact()

    def _compact(self) -> None:
        keep = self._alive[: self._n]
        kept = int(keep.sum())
        keep_rows = keep.nonzero().squeeze(1)
        self._vectors[:kept] = self._vectors[: self._n][keep_rows]
        self._labels[:kept] = self._labels[: self._n][keep_rows.cpu().numpy()]
        self._alive[:kept] = True
        self._alive[kept : self._n] = False
        self._n, self._dead = kept, 0

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels), each (len(queries), k), best first; label -1 pads a short row.
        `allowed`: the only labels that may be returned (a metadata filter)."""
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=self.device)
        q = q.to(self.dtype).reshape(-1, self.dim)
        mask = self._alive[: self._n]
        if allowed is not None:
            ok = np.isin(self._labels[: self._n], np.asarray(allowed, dtype=np.int64))
            mask = mask & torch.as_tensor(ok, device=self.device)
        k = min(k, self._n)
        if k == 0:
            empty = np.zeros((len(q), 0))
            return empty.astype(np.float32), empty.astype(np.int64)
        vectors = self._vectors[: self._n]
        top, rows = [], []
        step = max(1, SCORES_PER_CHUNK // self._n)  # bounds the (queries x rows) score matrix
        for start in range(0, len(q), step):
            scores = q[start : start + step] @ vectors.T
            scores.masked_fill_(~mask, float("-inf"))
            best, where = torch.topk(scores, k, dim=1)
            top.append(best.float().cpu())
            rows.append(where.cpu())
        scores_np = torch.cat(top).numpy()
        labels = self._labels[: self._n][torch.cat(rows).numpy()]
        labels[~np.isfinite(scores_np)] = -1
        return scores_np, labels
