"""Durable memories: the log is the truth, snapshots are atomic, restarts lose nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mneme.config import IndexConfig
from mneme.durable import DurableStore, MemoryLog, read_snapshot
from mneme.records import NewMemory

DIM = 8


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_an_acknowledged_add_survives_a_restart_without_any_snapshot(tmp_path):
    rng = np.random.default_rng(0)
    store = DurableStore(tmp_path, snapshot_every=10_000)
    store.upsert("a", [NewMemory("m1", "first", {"k": 1})], unit(rng, 1))
    store.upsert("b", [NewMemory("m1", "other namespace")], unit(rng, 1))
    del store  # a crash: nothing flushed beyond what the log committed
    again = DurableStore(tmp_path)
    assert again.replayed == 2
    assert again.get("a", "m1").text == "first" and again.get("a", "m1").metadata == {"k": 1}
    assert again.get("b", "m1").text == "other namespace"


def test_snapshot_then_replay_only_the_tail(tmp_path):
    rng = np.random.default_rng(1)
    store = DurableStore(tmp_path, snapshot_every=3)
    for i in range(7):
        store.upsert("a", [NewMemory(f"m{i}", f"text {i}")], unit(rng, 1))
        store.wait_for_snapshot()  # written in the background
    assert store.snapshot_position == {"sqlite": 6}  # taken at 3 and 6 writes
    restored, seq = read_snapshot(store.snapshot_path)
    assert seq == {"sqlite": 6} and restored.stats()["memories"] == 6
    again = DurableStore(tmp_path, snapshot_every=3)
    assert again.replayed == 1 and again.stats()["memories"] == 7
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed, not left


def test_two_replicas_on_one_log_see_each_others_writes_in_order(tmp_path):
    rng = np.random.default_rng(2)
    left, right = DurableStore(tmp_path), DurableStore(tmp_path)
    v1, v2 = unit(rng, 1), unit(rng, 1)
    left.upsert("a", [NewMemory("x", "from left")], v1)
    right.upsert("a", [NewMemory("x", "from right")], v2)  # replaces, after left's write
    for replica in (left, right):
        assert replica.get("a", "x").text == "from right"
        [[hit]] = replica.search("a", v2, 1, None)
        assert (hit.id, hit.text) == ("x", "from right")
    assert right.delete("a", "x") is True
    assert left.get("a", "x") is None
    assert left.delete("a", "x") is False  # nothing logged for a memory already gone
    assert len(left.log.after({})) == 3  # three writes logged in all


class CountingLog:
    """The real log, with its reads counted."""

    def __init__(self, log):
        self._log = log
        self.reads = 0

    def after(self, position, limit=10_000):
        self.reads += 1
        return self._log.after(position, limit)

    def __getattr__(self, name):
        return getattr(self._log, name)


def test_a_batch_of_searches_over_several_namespaces_reads_the_log_once(tmp_path):
    rng = np.random.default_rng(5)
    writer, reader = DurableStore(tmp_path), DurableStore(tmp_path)
    vectors = unit(rng, 3)
    for ns, vector in zip("abc", vectors, strict=True):
        writer.upsert(ns, [NewMemory("m", f"in {ns}")], vector[None, :])
    reader.log = CountingLog(reader.log)
    groups = [(ns, vector[None, :], 1, None) for ns, vector in zip("abc", vectors, strict=True)]
    found = reader.search_many(groups)
    # every group sees the other replica's writes, and the log was read once for all three
    # (one read that applied them, one that found nothing more)
    assert [hits[0][0].text for hits in found] == ["in a", "in b", "in c"]
    assert reader.log.reads == 2


def test_a_snapshot_that_does_not_match_its_map_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    store = DurableStore(tmp_path)
    store.upsert("a", [NewMemory("m", "t")], unit(rng, 1))
    state = store.store.state()
    state["namespaces"][0]["memories"] = []
    from mneme.index import MemoryStore

    with pytest.raises(ValueError, match="1 vectors but 0 memories"):
        MemoryStore.from_state(state)


def test_log_entries_are_durable_in_order(tmp_path):
    log = MemoryLog(tmp_path / "log.sqlite")
    seqs = [log.append("ns", "delete", f"id{i}") for i in range(5)]
    assert seqs == [("sqlite", n) for n in range(1, 6)]
    reopened = MemoryLog(tmp_path / "log.sqlite")
    assert [e.payload for e in reopened.after({"sqlite": 2})] == ["id2", "id3", "id4"]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("seed", range(3))
def test_random_adds_deletes_snapshots_and_restarts_match_a_model(tmp_path, seed, kind):
    """No lost, resurrected or drifted memory after any interleaving (a seeded loop), with
    every index kind (hnsw / ivf from 8 memories on; at this size they search exhaustively)."""
    run_random_history(tmp_path, seed, IndexConfig(kind=kind, min_size=8), None)


@pytest.mark.redis
@pytest.mark.parametrize("seed", range(2))
def test_random_history_with_the_log_in_redis_streams(tmp_path, seed, log_redis):
    run_random_history(tmp_path, seed, IndexConfig(kind="hnsw", min_size=8), log_redis.url)


@pytest.mark.redis
def test_acknowledged_writes_survive_redis_killed_and_restarted_with_aof(tmp_path):
    from tests.redis_server import RedisServer

    redis = RedisServer(appendfsync="always").start()
    try:
        rng = np.random.default_rng(5)
        store = DurableStore(tmp_path / "a", redis_url=redis.url)
        vectors = unit(rng, 40)
        for i in range(40):
            store.upsert(f"ns{i % 3}", [NewMemory(f"m{i}", f"text {i}")], vectors[i : i + 1])
        assert store.delete("ns0", "m0")
        redis.stop()  # SIGKILL: no clean shutdown, only what the AOF has
        redis.start()
        fresh = DurableStore(tmp_path / "b", redis_url=redis.url)  # no snapshot: all replayed
        assert fresh.replayed == 41
        assert fresh.stats()["memories"] == 39 and fresh.get("ns1", "m1").text == "text 1"
        [[hit]] = fresh.search("ns2", vectors[5:6], 1, None)
        assert hit.id == "m5"
        store.upsert("ns1", [NewMemory("late", "after the restart")], unit(rng, 1))
        assert fresh.get("ns1", "late").text == "after the restart"  # followed, via Redis
    finally:
        redis.cleanup()


def run_random_history(tmp_path, seed: int, index: IndexConfig, redis_url: str | None) -> None:
    rng = random.Random(seed)
    vectors = np.random.default_rng(seed)

    def open_replica(every: int = 1000) -> DurableStore:
        return DurableStore(tmp_path, "NORMAL", every, index, redis_url)

    replicas = [open_replica(rng.randint(2, 9))]
    model: dict[str, dict[str, tuple[str, np.ndarray]]] = {"a": {}, "b": {}}
    for step in range(300):
        action = rng.random()
        ns = rng.choice(["a", "b"])
        replica = rng.choice(replicas)
        if action < 0.45:
            ids = [f"m{rng.randint(0, 30)}" for _ in range(rng.randint(1, 3))]
            ids = list(dict.fromkeys(ids))
            vecs = unit(vectors, len(ids))
            items = [NewMemory(i, f"{ns}:{i}@{step}") for i in ids]
            replica.upsert(ns, items, vecs)
            for item, vec in zip(items, vecs, strict=True):
                model[ns][item.id] = (item.text, vec)
        elif action < 0.7:
            memory_id = f"m{rng.randint(0, 30)}"
            assert replica.delete(ns, memory_id) == (memory_id in model[ns])
            model[ns].pop(memory_id, None)
        elif action < 0.8:
            replica.snapshot()
        elif action < 0.9:  # a replica crashes and a new one starts from disk
            replicas.remove(replica)
            replicas.append(open_replica(rng.randint(2, 9)))
        elif len(replicas) < 3:
            replicas.append(open_replica())
        check = rng.choice(replicas)
        for name, memories in model.items():
            listed = check.page(name, 1000, None).memories
            assert {m.id: m.text for m in listed} == {k: t for k, (t, _) in memories.items()}
            if memories:
                query = unit(vectors, 1)
                [hits] = check.search(name, query, 3, None)
                expected = sorted(memories, key=lambda k: -float(memories[k][1] @ query[0]))[:3]
                assert [h.id for h in hits] == expected
                assert all(h.text == memories[h.id][0] for h in hits)


def test_a_write_no_index_could_take_is_refused_before_it_is_logged(tmp_path):
    """Logged, it would fail on every replica that replays it, at every start."""
    rng = np.random.default_rng(5)
    store = DurableStore(tmp_path)
    store.upsert("a", [NewMemory("m1", "first")], unit(rng, 1))
    for items, vectors in [
        ([NewMemory("m2", "wider")], np.ones((1, DIM * 2), np.float32)),  # another model
        ([NewMemory("m2", "nan")], np.full((1, DIM), np.nan, np.float32)),
        ([NewMemory("m2", "x"), NewMemory("m2", "y")], unit(rng, 2)),
        ([NewMemory("m2", "two rows for one")], unit(rng, 2)),
    ]:
        with pytest.raises(ValueError):
            store.upsert("a", items, vectors)
    store.upsert("a", [NewMemory("m3", "still writable")], unit(rng, 1))
    again = DurableStore(tmp_path)  # replays cleanly
    assert again.replayed == 2 and again.get("a", "m3") is not None
    assert again.get("a", "m2") is None


def test_a_failed_snapshot_does_not_fail_the_write(tmp_path):
    rng = np.random.default_rng(6)
    store = DurableStore(tmp_path, snapshot_every=1)
    store.snapshot_path.mkdir()  # a snapshot cannot be renamed over a directory
    assert store.upsert("a", [NewMemory("m1", "kept")], unit(rng, 1)) == ["m1"]
    assert store.get("a", "m1").text == "kept"
    store.wait_for_snapshot()
    assert store.snapshot_position == {}  # the failed one records nothing
    assert not list(tmp_path.glob(".snapshot.pkl.*.tmp"))  # nor leaves its file behind
    store.snapshot_path.rmdir()
    store.upsert("a", [NewMemory("m2", "and the next")], unit(rng, 1))
    store.wait_for_snapshot()
    assert store.snapshot_path.is_file()  # tried again at the next one
    assert DurableStore(tmp_path).stats()["memories"] == 2


def test_writes_after_a_log_that_lost_its_tail_are_not_taken_for_the_snapshots(tmp_path):
    """Under synchronous NORMAL a power cut may lose the log's last commits after a
    snapshot recorded them; new writes must be numbered after the snapshot, or every
    restart would skip them as already in it."""
    rng = np.random.default_rng(7)
    cut_after_snapshot(tmp_path, rng)
    after = DurableStore(tmp_path, synchronous="NORMAL")
    after.upsert("a", [NewMemory("new", "after the cut")], unit(rng, 1))
    assert DurableStore(tmp_path).get("a", "new") is not None


def test_a_redis_that_may_lose_the_log_is_refused(tmp_path, redis_server):
    """The log is the memories' only copy: not in a Redis that evicts keys when full, nor in
    one without AOF (Redis's default), which a restart rolls back to its last RDB save."""
    import redis

    server = redis.Redis.from_url(redis_server.url)
    with pytest.raises(ValueError, match="appendonly no"):
        DurableStore(tmp_path, redis_url=redis_server.url)
    server.config_set("appendonly", "yes")
    server.config_set("maxmemory", "100mb")
    server.config_set("maxmemory-policy", "allkeys-lru")  # a cache's settings
    with pytest.raises(ValueError, match="maxmemory-policy allkeys-lru"):
        DurableStore(tmp_path, redis_url=redis_server.url)
    server.config_set("maxmemory-policy", "noeviction")
    DurableStore(tmp_path, redis_url=redis_server.url).log.close()


def cut_after_snapshot(tmp_path, rng) -> None:
    """Three writes and a snapshot at 3, then the log cut back to its first entry (what a
    power cut under synchronous NORMAL could leave)."""
    store = DurableStore(tmp_path, synchronous="NORMAL", snapshot_every=3)
    for i in range(3):
        store.upsert("a", [NewMemory(f"m{i}", f"text {i}")], unit(rng, 1))
    store.wait_for_snapshot()
    assert store.snapshot_position == {"sqlite": 3}
    store.log.close()
    cut = MemoryLog(tmp_path / "memories.sqlite")
    cut._db.execute("DELETE FROM ops WHERE seq > 1")
    cut._db.execute("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'ops'")
    cut.close()


def test_a_replica_writing_while_another_renumbers_the_log_is_not_numbered_before_it(tmp_path):
    """A replica starting on a cut log renumbers it after its snapshot; another replica's
    write must not land between the two statements of that (numbered 2, from the table's
    end, it would be skipped by every replica past 3). Here the other write is tried at the
    worst moment: it must wait (it times out) or come after the snapshot."""
    import sqlite3

    cut_after_snapshot(tmp_path, np.random.default_rng(8))
    other = sqlite3.connect(tmp_path / "memories.sqlite", timeout=0.05, isolation_level=None)
    tried: list[str] = []

    def write_between(statement: str) -> None:
        if statement.startswith("DELETE FROM sqlite_sequence") and not tried:
            try:
                other.execute("INSERT INTO ops (namespace, op, payload) VALUES ('a', 'x', x'')")
                tried.append("written")
            except sqlite3.OperationalError as exc:
                tried.append(str(exc))

    log = MemoryLog(tmp_path / "memories.sqlite", "NORMAL")
    log._db.set_trace_callback(write_between)
    log.continue_after({"sqlite": 3})
    log._db.set_trace_callback(None)
    assert tried == ["database is locked"]
    _, seq = log.append("a", "delete", "m0")
    assert seq > 3
    log.close()
    other.close()


def test_a_write_numbered_before_the_replicas_position_is_not_acknowledged(tmp_path):
    """Whatever numbered it there (a log renumbered behind this replica's back), a write that
    no replica past that position would apply fails instead of being acknowledged."""
    rng = np.random.default_rng(9)
    cut_after_snapshot(tmp_path, rng)
    store = DurableStore(tmp_path, synchronous="NORMAL")
    assert store.applied == {"sqlite": 3}
    store.log._db.execute("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'ops'")
    with pytest.raises(RuntimeError, match="not acknowledged"):
        store.upsert("a", [NewMemory("lost", "numbered 2")], unit(rng, 1))


def test_a_snapshot_is_written_in_the_background_as_of_the_write_that_started_it(
    tmp_path, monkeypatch
):
    """While a snapshot is written (a slow disk, held here by wrapping the writer: a fault
    the real disk gives only at scale), the replica goes on taking writes and searches; the
    snapshot holds what was applied when it started, and no second one starts meanwhile."""
    import threading

    import mneme.durable

    rng = np.random.default_rng(10)
    disk_free, started = threading.Event(), []
    write = mneme.durable.write_snapshot

    def slow_disk_write_snapshot(state, position, path):
        started.append(dict(position))
        disk_free.wait(10)
        write(state, position, path)

    monkeypatch.setattr(mneme.durable, "write_snapshot", slow_disk_write_snapshot)
    store = DurableStore(tmp_path, snapshot_every=2)
    vectors = [unit(rng, 1) for _ in range(5)]
    for i, vector in enumerate(vectors):  # one starts at the 2nd write; the 4th finds it busy
        store.upsert("a", [NewMemory(f"m{i}", f"text {i}")], vector)
    [[hit]] = store.search("a", vectors[4], 1, None)
    assert hit.id == "m4" and started == [{"sqlite": 2}] and store.snapshotting()
    assert store.snapshot_position == {} and not store.snapshot_path.exists()
    disk_free.set()
    store.wait_for_snapshot()
    restored, position = read_snapshot(store.snapshot_path)
    assert position == {"sqlite": 2} == store.snapshot_position
    assert restored.stats()["memories"] == 2
    store.upsert("a", [NewMemory("m5", "text 5")], unit(rng, 1))  # 4 since: due again
    store.wait_for_snapshot()
    assert started[-1] == {"sqlite": 6} and store.snapshot_position == {"sqlite": 6}


def test_a_snapshot_file_a_killed_replica_left_is_removed_at_start(tmp_path):
    """A replica killed while writing its snapshot leaves the temporary file (a full-size
    copy); the next start removes it once it is old enough not to be another replica's,
    still being written."""
    import os
    import time

    left = tmp_path / ".snapshot.pkl.123.456.tmp"
    fresh = tmp_path / ".snapshot.pkl.789.1.tmp"
    for path in (left, fresh):
        path.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(left, (two_hours_ago, two_hours_ago))
    DurableStore(tmp_path)
    assert not left.exists() and fresh.exists()
