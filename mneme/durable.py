"""Durable memories: an append-only log in SQLite (WAL) is the source of truth, and the FAISS
store in a VectorSearch replica is a materialised view of it.

- A write (add or delete) is appended to the log and committed (fsync'd with
  `synchronous: FULL`) before it is applied or acknowledged.
- A replica starts from the newest snapshot (every namespace's FAISS index, serialised
  together with its map from FAISS labels to memories, in one file written to a temporary
  name, fsync'd and renamed over the old one), then replays the log after it.
- Every call first applies what the log has beyond the replica's position, so replicas that
  share a data directory (one node) all see every acknowledged write, in the log's order.

Pure Python + SQLite + FAISS (no Ray): unit-tested directly, crash-tested under Serve.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mneme.index import MemoryStore
from mneme.records import MemoryPage, NewMemory, SearchHit, StoredMemory

SNAPSHOT_NAME = "snapshot.pkl"
LOG_NAME = "memories.sqlite"
SNAPSHOT_FORMAT = 1


@dataclass(frozen=True)
class LogEntry:
    seq: int
    namespace: str
    op: str  # "upsert" | "delete"
    payload: Any  # (items, vectors) | memory id


class MemoryLog:
    """The append-only log: one row per write, numbered by SQLite in commit order."""

    def __init__(self, path: Path, synchronous: str = "FULL"):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS ops (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "namespace TEXT NOT NULL, op TEXT NOT NULL, payload BLOB NOT NULL)"
        )
        self._lock = threading.Lock()

    def append(self, namespace: str, op: str, payload: Any) -> int:
        """Commit one write; returns its sequence number once it is durable."""
        blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO ops (namespace, op, payload) VALUES (?, ?, ?)", (namespace, op, blob)
            )
            return int(cursor.lastrowid)

    def after(self, seq: int, limit: int = 10_000) -> list[LogEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, namespace, op, payload FROM ops WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            ).fetchall()
        return [LogEntry(s, ns, op, pickle.loads(blob)) for s, ns, op, blob in rows]

    def last_seq(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT MAX(seq) FROM ops").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        self._db.close()


def write_snapshot(store: MemoryStore, seq: int, path: Path) -> None:
    """Atomically replace `path` with the store's state as of log position `seq`."""
    state = {"format": SNAPSHOT_FORMAT, "seq": seq, "store": store.state()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def read_snapshot(path: Path) -> tuple[MemoryStore, int]:
    """(store, its log position); an empty store at 0 when there is no snapshot yet."""
    if not path.exists():
        return MemoryStore(), 0
    with open(path, "rb") as f:
        state = pickle.load(f)
    if state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: unknown snapshot format {state.get('format')!r}")
    return MemoryStore.from_state(state["store"]), int(state["seq"])


class DurableStore:
    """A `MemoryStore` that follows a `MemoryLog`, with periodic snapshots."""

    def __init__(self, data_dir: str | Path, synchronous: str = "FULL", snapshot_every: int = 1000):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.data_dir / SNAPSHOT_NAME
        self.snapshot_every = snapshot_every
        self.log = MemoryLog(self.data_dir / LOG_NAME, synchronous)
        self.store, self.applied = read_snapshot(self.snapshot_path)
        self.snapshot_seq = self.applied
        self.replayed = self.catch_up()  # what the last snapshot did not have

    def catch_up(self) -> int:
        """Apply every logged write after our position, in log order; returns how many."""
        applied = 0
        while True:
            entries = self.log.after(self.applied)
            if not entries:
                return applied
            for entry in entries:
                self._apply(entry)
                self.applied = entry.seq
            applied += len(entries)

    def _apply(self, entry: LogEntry) -> None:
        if entry.op == "upsert":
            items, vectors = entry.payload
            self.store.upsert(entry.namespace, items, vectors)
        elif entry.op == "delete":
            self.store.delete(entry.namespace, entry.payload)
        else:
            raise ValueError(f"log entry {entry.seq}: unknown op {entry.op!r}")

    def _write(self, namespace: str, op: str, payload: Any) -> None:
        self.log.append(namespace, op, payload)  # durable from here on
        self.catch_up()  # applies ours after anything another replica logged first
        if self.applied - self.snapshot_seq >= self.snapshot_every:
            self.snapshot()

    def snapshot(self) -> None:
        write_snapshot(self.store, self.applied, self.snapshot_path)
        self.snapshot_seq = self.applied

    # The same calls as MemoryStore.
    def upsert(self, namespace: str, items: Sequence[NewMemory], vectors: np.ndarray) -> list[str]:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._write(namespace, "upsert", (list(items), vectors))
        return [item.id for item in items]

    def delete(self, namespace: str, memory_id: str) -> bool:
        self.catch_up()
        if self.store.get(namespace, memory_id) is None:
            return False
        self._write(namespace, "delete", memory_id)
        return True

    def get(self, namespace: str, memory_id: str) -> StoredMemory | None:
        self.catch_up()
        return self.store.get(namespace, memory_id)

    def page(self, namespace: str, limit: int, cursor: int | None) -> MemoryPage:
        self.catch_up()
        return self.store.page(namespace, limit, cursor)

    def search(
        self, namespace: str, queries: np.ndarray, top_k: int, flt: dict[str, Any] | None
    ) -> list[list[SearchHit]]:
        self.catch_up()
        return self.store.search(namespace, queries, top_k, flt)

    def lag(self) -> int:
        """Logged writes this replica has not applied (0 right after `catch_up`)."""
        return self.log.last_seq() - self.applied

    def stats(self) -> dict[str, Any]:
        return {
            **self.store.stats(),
            "log_position": self.applied,
            "snapshot_position": self.snapshot_seq,
            "replayed_at_start": self.replayed,
            "data_dir": str(self.data_dir),
        }
