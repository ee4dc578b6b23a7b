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

import logging
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cache.keys import bucket_of
from mneme.config import IndexConfig
from mneme.index import MemoryStore, SearchGroup, checked_vectors
from mneme.records import MemoryPage, NewMemory, SearchHit, StoredMemory

SNAPSHOT_NAME = "snapshot.pkl"
LOG_NAME = "memories.sqlite"
SNAPSHOT_FORMAT = 2
STALE_TMP_S = 3600.0  # a snapshot's temporary file this old: its replica was killed writing it
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LogEntry:
    stream: str  # one log is one or more streams, each totally ordered
    seq: Any  # the entry's position in its stream (int for SQLite, "ms-n" for Redis)
    namespace: str  # all writes of a namespace go to one stream, so they stay in order
    op: str  # "upsert" | "delete"
    payload: Any  # (items, vectors) | memory id


Position = dict[str, Any]  # stream -> position of the last applied entry


class MemoryLog:
    """The append-only log in SQLite: one row per write, numbered in commit order (a single
    stream, shared by the replicas of one node)."""

    STREAM = "sqlite"

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

    def append(self, namespace: str, op: str, payload: Any) -> tuple[str, int]:
        """Commit one write; returns its (stream, sequence number) once it is durable."""
        blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO ops (namespace, op, payload) VALUES (?, ?, ?)", (namespace, op, blob)
            )
            return self.STREAM, int(cursor.lastrowid)

    @staticmethod
    def order(seq: Any) -> int:
        """A sequence number as something that sorts in log order."""
        return int(seq)

    def sync(self) -> None:
        """Make every committed write durable (with `synchronous: NORMAL` the last commits
        may be in an unsynced WAL): called before a snapshot records a position."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(FULL)")

    def continue_after(self, position: Position) -> None:
        """New writes are numbered after `position`. A power cut under `synchronous: NORMAL`
        can lose the log's last commits that a snapshot already holds; numbered again from
        there, new writes would be skipped as already in the snapshot, on every restart."""
        seq = int(position.get(self.STREAM, 0))
        with self._lock:
            (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM ops").fetchone()
            if last >= seq:
                return
            logger.warning(
                "memory log %s ends at %d, before its snapshot's position %d (lost in a power "
                "cut?); the snapshot has those writes, new ones are numbered after it",
                self.path,
                last,
                seq,
            )
            # one transaction: a replica on this log writing between a delete and an insert
            # would be numbered from the table's end again, before the snapshot's position
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (last,) = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM ops").fetchone()
                self._db.execute("DELETE FROM sqlite_sequence WHERE name = 'ops'")
                self._db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('ops', ?)", (max(last, seq),)
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def after(self, position: Position, limit: int = 10_000) -> list[LogEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, namespace, op, payload FROM ops WHERE seq > ? ORDER BY seq LIMIT ?",
                (int(position.get(self.STREAM, 0)), limit),
            ).fetchall()
        return [LogEntry(self.STREAM, s, ns, op, pickle.loads(blob)) for s, ns, op, blob in rows]

    def close(self) -> None:
        self._db.close()


class RedisMemoryLog:
    """The log in Redis Streams, for replicas on several nodes: `groups` streams, a namespace
    always in the same one (so its writes stay in order). An append returns once Redis has
    it; what that promises on a power cut is Redis's `appendfsync` (README: Durability)."""

    def __init__(self, url: str, prefix: str = "mneme:log", groups: int = 16):
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=10, health_check_interval=10)
        self.streams = [f"{prefix}:{g}" for g in range(groups)]
        self._refuse_an_unsafe_redis(url)

    def _refuse_an_unsafe_redis(self, url: str) -> None:
        """The log is the memories' only copy. Refused: a Redis that may evict keys when full
        (a cache's settings), which would drop a stream and with it every write after the
        snapshot; and one without AOF (`appendonly no`, Redis's default), which a restart
        rolls back to its last RDB save, losing every acknowledged write since."""
        import redis

        try:
            config = self._redis.config_get("maxmemory*") | self._redis.config_get("appendonly")
        except redis.ResponseError as exc:  # CONFIG turned off, as in some managed Redis
            logger.warning(
                "cannot read %s's settings (%s): it must run with maxmemory-policy noeviction "
                "and appendonly yes",
                url,
                exc,
            )
            return
        policy = config.get("maxmemory-policy", "noeviction")
        if int(config.get("maxmemory", 0)) and policy != "noeviction":
            raise ValueError(
                f"vector_search.storage.redis_url: {url} may evict keys when full "
                f"(maxmemory-policy {policy}), and the memory log would lose writes; give the "
                "log a Redis with maxmemory-policy noeviction (or maxmemory 0), not the cache's"
            )
        if config.get("appendonly", "yes") != "yes":
            raise ValueError(
                f"vector_search.storage.redis_url: {url} runs without AOF (appendonly no), so "
                "a restart would roll the memory log back to its last snapshot and lose "
                "acknowledged writes; run it with --appendonly yes --appendfsync always "
                "(README: Durability)"
            )

    def _stream(self, namespace: str) -> str:
        return self.streams[bucket_of(namespace, len(self.streams))]

    def sync(self) -> None:
        """What Redis has is as durable as its `appendfsync` makes it."""

    def continue_after(self, position: Position) -> None:
        """Stream ids are times: new writes come after the snapshot's (clocks allowing)."""

    def append(self, namespace: str, op: str, payload: Any) -> tuple[str, str]:
        blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        stream = self._stream(namespace)
        entry = self._redis.xadd(stream, {"ns": namespace, "op": op, "p": blob})
        return stream, entry.decode()

    @staticmethod
    def order(seq: Any) -> tuple[int, int]:
        """A stream entry id ("ms-n") as something that sorts in stream order."""
        ms, _, n = str(seq).partition("-")
        return int(ms), int(n or 0)

    def after(self, position: Position, limit: int = 10_000) -> list[LogEntry]:
        streams = {name: position.get(name, "0-0") for name in self.streams}
        out = []
        for name, entries in self._redis.xread(streams, count=limit) or []:
            name = name.decode()
            for entry_id, fields in entries:
                out.append(
                    LogEntry(
                        name,
                        entry_id.decode(),
                        fields[b"ns"].decode("utf-8", "surrogatepass"),
                        fields[b"op"].decode(),
                        pickle.loads(fields[b"p"]),
                    )
                )
        return out

    def close(self) -> None:
        self._redis.close()


def write_snapshot(store_state: dict, position: Position, path: Path) -> None:
    """Atomically replace `path` with a store's state (`MemoryStore.state()`, a copy) as of
    log `position`."""
    state = {"format": SNAPSHOT_FORMAT, "position": dict(position), "store": store_state}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a disk that filled up gets its space back
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def remove_stale_tmp(path: Path, now: float) -> list[Path]:
    """Snapshots' temporary files that replicas killed while writing them left beside `path`
    (one written now by another replica is younger than `STALE_TMP_S`)."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # renamed or removed by its replica meanwhile
            continue
    return removed


def read_snapshot(
    path: Path, index_config: IndexConfig | None = None
) -> tuple[MemoryStore, Position]:
    """(store, its log position); an empty store at the start when there is no snapshot."""
    if not path.exists():
        return MemoryStore(index_config=index_config), {}
    with open(path, "rb") as f:
        state = pickle.load(f)
    if state.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"{path}: unknown snapshot format {state.get('format')!r}")
    return MemoryStore.from_state(state["store"], index_config), dict(state["position"])


class DurableStore:
    """A `MemoryStore` that follows a memory log (SQLite in `data_dir`, or Redis Streams
    when `redis_url` is given), with periodic snapshots in `data_dir`."""

    def __init__(
        self,
        data_dir: str | Path,
        synchronous: str = "FULL",
        snapshot_every: int = 1000,
        index_config: IndexConfig | None = None,
        redis_url: str | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.snapshot_path = self.data_dir / SNAPSHOT_NAME
        for tmp in remove_stale_tmp(self.snapshot_path, time.time()):
            logger.warning("removed %s, a snapshot its replica did not finish", tmp)
        self.snapshot_every = snapshot_every
        self.log: MemoryLog | RedisMemoryLog = (
            RedisMemoryLog(redis_url)
            if redis_url
            else MemoryLog(self.data_dir / LOG_NAME, synchronous)
        )
        self.store, self.applied = read_snapshot(self.snapshot_path, index_config)
        self.log.continue_after(self.applied)
        self.writes_since_snapshot = 0
        self.snapshot_position = dict(self.applied)
        self._snapshot_writer: threading.Thread | None = None
        self.replayed = self.catch_up()  # what the last snapshot did not have

    def catch_up(self) -> int:
        """Apply every logged write after our position, in each stream's order."""
        applied = 0
        while True:
            entries = self.log.after(self.applied)
            if not entries:
                return applied
            for entry in entries:
                self._apply(entry)
                self.applied[entry.stream] = entry.seq
            applied += len(entries)
            self.writes_since_snapshot += len(entries)

    def _apply(self, entry: LogEntry) -> None:
        if entry.op == "upsert":
            items, vectors = entry.payload
            self.store.upsert(entry.namespace, items, vectors)
        elif entry.op == "delete":
            self.store.delete(entry.namespace, entry.payload)
        else:
            raise ValueError(f"log entry {entry.stream}/{entry.seq}: unknown op {entry.op!r}")

    def _write(self, namespace: str, op: str, payload: Any) -> None:
        stream, seq = self.log.append(namespace, op, payload)  # durable from here on
        passed = self.applied.get(stream)
        if passed is not None and self.log.order(seq) <= self.log.order(passed):
            # numbered where this replica had already passed: it would never apply it (nor
            # would a replica starting from its snapshots), so it must not be acknowledged
            raise RuntimeError(
                f"memory log {stream}: a write was numbered {seq}, not after position "
                f"{passed} that this replica had applied; it is not acknowledged"
            )
        self.catch_up()  # applies ours after anything another replica logged first
        if self.writes_since_snapshot >= self.snapshot_every and not self.snapshotting():
            self._snapshot_in_background()

    def snapshotting(self) -> bool:
        return self._snapshot_writer is not None and self._snapshot_writer.is_alive()

    def _snapshot_in_background(self) -> None:
        """The store's state is copied here, on the caller's thread (about a third of the
        work: 0.5 of 1.4 s for 200,000 memories); it is pickled and written on a thread of
        its own while the replica serves on. A failure is logged, and tried again after
        another `snapshot_every` writes: the writes are logged, a late snapshot only
        lengthens a replay."""
        self.writes_since_snapshot = 0
        try:
            self.log.sync()  # the position it records must not be ahead of a durable log
            position, state = dict(self.applied), self.store.state()
        except Exception as exc:
            logger.error("snapshot to %s failed: %r", self.snapshot_path, exc)
            return

        def write() -> None:
            try:
                write_snapshot(state, position, self.snapshot_path)
            except Exception as exc:
                logger.error("snapshot to %s failed: %r", self.snapshot_path, exc)
                return
            self.snapshot_position = position

        self._snapshot_writer = threading.Thread(target=write, name="mneme-snapshot", daemon=True)
        self._snapshot_writer.start()

    def wait_for_snapshot(self) -> None:
        """Until the snapshot being written in the background, if any, is on disk."""
        if self._snapshot_writer is not None:
            self._snapshot_writer.join()

    def snapshot(self) -> None:
        """A snapshot now (after any being written in the background), waited for."""
        self.wait_for_snapshot()
        self._snapshot_in_background()
        self.wait_for_snapshot()

    # The same calls as MemoryStore.
    def upsert(self, namespace: str, items: Sequence[NewMemory], vectors: np.ndarray) -> list[str]:
        if self.store.dim is None:  # another replica may have set it since
            self.catch_up()
        vectors = checked_vectors(items, vectors, self.store.dim)  # never log what fails
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

    def search_many(self, groups: Sequence[SearchGroup]) -> list[list[list[SearchHit]]]:
        """One batch of searches over several namespaces: the log is read once for all of
        them (a Redis round trip per namespace otherwise)."""
        self.catch_up()
        return self.store.search_many(groups)

    def finish_rebuilds(self) -> None:
        self.store.finish_rebuilds()

    def stats(self) -> dict[str, Any]:
        return {
            **self.store.stats(),
            "log": type(self.log).__name__,
            "log_position": dict(self.applied),
            "snapshot_position": self.snapshot_position,
            "replayed_at_start": self.replayed,
            "data_dir": str(self.data_dir),
        }
