"""Acknowledged memories survive a killed VectorSearch replica and a restarted application,
and replicas sharing one memory log answer alike. Real processes, real SIGKILL."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import numpy as np
import psutil
import pytest
from ray import serve

from deployments.vector_search import VectorSearch
from mneme.config import IndexConfig, StorageConfig, VectorSearchConfig
from mneme.records import NewMemory, SearchQuery

pytestmark = pytest.mark.slow


def vector_search_pids() -> list[int]:
    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "ServeReplica:mneme:VectorSearch" in " ".join(p.info["cmdline"] or [])
    ]


def listed_ids(http, namespace: str) -> list[str]:
    ids, cursor = [], None
    while True:
        params = {"namespace": namespace, "limit": 100} | ({"cursor": cursor} if cursor else {})
        r = http.get("/v1/memories", params=params)
        assert r.status_code == 200, r.text
        ids += [m["id"] for m in r.json()["data"]]
        cursor = r.json()["next_cursor"]
        if not cursor:
            return ids


def test_acknowledged_adds_survive_a_replica_killed_mid_stream(served, http):
    namespace = f"crash-{uuid.uuid4().hex[:8]}"
    acknowledged: list[str] = []
    refused = 0
    stop = threading.Event()

    def stream() -> None:
        nonlocal refused
        with served.client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                item = {"id": f"m{i}", "text": f"memory number {i} of the crash test"}
                r = client.post("/v1/memories", json={"namespace": namespace, "items": [item]})
                if r.status_code == 200:
                    acknowledged.append(item["id"])
                else:
                    refused += 1
                i += 1

    [pid] = vector_search_pids()
    writer = threading.Thread(target=stream)
    writer.start()
    time.sleep(1.5)
    before_kill = len(acknowledged)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    recovered_at = None
    while time.monotonic() - killed_at < 60:
        pids = vector_search_pids()
        if pids and pids != [pid] and len(acknowledged) > before_kill + 20:
            if recovered_at is None:
                recovered_at = time.monotonic()
            break
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    writer.join()
    assert recovered_at is not None, "no new VectorSearch replica took writes within 60 s"
    stored = listed_ids(http, namespace)
    lost = set(acknowledged) - set(stored)
    print(
        f"\nacknowledged {len(acknowledged)} (before the kill {before_kill}), refused "
        f"{refused}, stored {len(stored)}, lost {len(lost)}, "
        f"recovery {recovered_at - killed_at:.1f} s"
    )
    assert not lost
    assert len(stored) == len(set(stored))  # nothing duplicated by the replay
    hits = http.post(
        "/v1/memories/search",
        json={"namespace": namespace, "query": acknowledged[0].replace("m", "memory number ")},
    ).json()["hits"]
    assert hits and all(h["id"] in set(stored) for h in hits)


def test_memories_survive_a_restarted_application_and_replicas_agree(served, tmp_path):
    """A VectorSearch-only application (no vLLM, so it restarts in seconds) on its own log."""
    config = VectorSearchConfig(
        storage=StorageConfig(data_dir=str(tmp_path), synchronous="FULL"),
        index=IndexConfig(kind="ivf", min_size=20),  # small: one list, so still exact
    )
    name = f"durable-{uuid.uuid4().hex[:6]}"
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [NewMemory(f"id{i}", f"text {i}", {"i": i}) for i in range(40)]

    def deploy(replicas: int):
        app = VectorSearch.options(num_replicas=replicas).bind(config)
        return serve.run(app, name=name, route_prefix=None)

    try:
        handle = deploy(1)
        handle.upsert.remote("ns", items[:30], vectors[:30]).result()
        assert handle.delete.remote("ns", "id3").result() is True
        serve.delete(name)  # the whole application goes away
        handle = deploy(2)  # and comes back with two replicas on the same log
        handle.upsert.remote("ns", items[30:], vectors[30:]).result()  # lands on one of them
        query = SearchQuery("ns", vectors[7], 5, None)
        answers, replicas = set(), set()
        deadline = time.monotonic() + 30  # until the handle has routed to both replicas
        while len(replicas) < 2 and time.monotonic() < deadline:
            for _ in range(10):  # concurrent calls spread over the replicas
                searches = [handle.search.remote(query) for _ in range(4)]
                stats = [handle.stats.remote() for _ in range(4)]
                for hits in (r.result() for r in searches):
                    answers.add(tuple((h.id, h.text, round(h.score, 5)) for h in hits))
                replicas.update(r.result()["replica"] for r in stats)
            time.sleep(0.2)
        assert len(replicas) == 2  # both replicas answered ...
        assert len(answers) == 1  # ... alike
        [answer] = answers
        assert answer[0][:2] == ("id7", "text 7")
        page = handle.page.remote("ns", 100, None).result()
        assert sorted(m.id for m in page.memories) == sorted(f"id{i}" for i in range(40) if i != 3)
        assert handle.get.remote("ns", "id3").result() is None  # the delete survived too
        assert handle.stats.remote().result()["index_kinds"] == {"ivf": 1}
    finally:
        serve.delete(name)


class AddStream(threading.Thread):
    """Calls `send(memory_id)` with new ids until `finish()`, keeping the acknowledged ones."""

    def __init__(self, send):
        super().__init__(daemon=True)
        self.send = send
        self.acknowledged: list[str] = []
        self.refused = 0
        self._done = threading.Event()

    def run(self) -> None:
        i = 0
        while not self._done.is_set():
            try:
                ok = self.send(f"m{i}")
            except Exception:  # a refused or failed call: not acknowledged
                ok = False
            if ok:
                self.acknowledged.append(f"m{i}")
            else:
                self.refused += 1
                time.sleep(0.05)
            i += 1

    def finish(self) -> AddStream:
        self._done.set()
        self.join()
        return self


def test_acknowledged_adds_survive_a_full_application_restart_mid_stream(served, http):
    """`serve.delete` of the whole graph (vLLM included) and `serve.run` again while a client
    keeps adding: every acknowledged memory is there afterwards, none twice."""
    from tests.integration.conftest import APP_NAME, redeploy

    namespace = f"restart-{uuid.uuid4().hex[:8]}"

    def send(memory_id: str) -> bool:
        with served.client(timeout=10) as client:
            item = {"id": memory_id, "text": f"kept across restarts: {memory_id}"}
            r = client.post("/v1/memories", json={"namespace": namespace, "items": [item]})
            return r.status_code == 200

    writer = AddStream(send)
    writer.start()
    time.sleep(1.0)
    started = time.monotonic()
    serve.delete(APP_NAME)
    redeploy()
    restart_s = time.monotonic() - started
    time.sleep(1.0)
    writer.finish()
    stored = listed_ids(http, namespace)
    lost = set(writer.acknowledged) - set(stored)
    print(
        f"\nacknowledged {len(writer.acknowledged)}, refused {writer.refused}, stored "
        f"{len(stored)}, lost {len(lost)}, application back in {restart_s:.1f} s"
    )
    assert writer.acknowledged and not lost and len(stored) == len(set(stored))


@pytest.mark.redis
def test_acknowledged_adds_survive_redis_killed_mid_stream_with_the_log_in_redis(tmp_path):
    """The log in Redis Streams (AOF, appendfsync always): Redis is SIGKILLed and restarted
    while adds stream in (redis-py's retries may carry calls over the gap), then the
    VectorSearch replica is killed too: nothing acknowledged is lost or doubled."""
    from tests.redis_server import RedisServer

    redis = RedisServer(appendfsync="always").start()
    name = f"redislog-{uuid.uuid4().hex[:6]}"
    storage = StorageConfig(data_dir=str(tmp_path), redis_url=redis.url)
    try:
        handle = serve.run(
            VectorSearch.bind(VectorSearchConfig(storage=storage)), name=name, route_prefix=None
        )
        assert handle.stats.remote().result()["log"] == "RedisMemoryLog"
        vector = np.ones((1, 384), dtype=np.float32) / np.sqrt(384)

        def send(memory_id: str) -> bool:
            item = NewMemory(memory_id, f"text of {memory_id}")
            return handle.upsert.remote("ns", [item], vector).result(timeout_s=10) == [memory_id]

        writer = AddStream(send)
        writer.start()
        time.sleep(1.0)
        before_kill = len(writer.acknowledged)
        redis.stop()  # SIGKILL
        time.sleep(1.0)
        redis.start()  # the AOF is replayed
        time.sleep(1.5)
        writer.finish()
        [pid] = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if f"ServeReplica:{name}:VectorSearch" in " ".join(p.info["cmdline"] or [])
        ]
        os.kill(pid, signal.SIGKILL)  # the replica restarts from the snapshot + Redis
        deadline = time.monotonic() + 60
        while True:
            try:
                page = handle.page.remote("ns", 100_000, None).result(timeout_s=10)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        stored = [m.id for m in page.memories]
        lost = set(writer.acknowledged) - set(stored)
        print(
            f"\nacknowledged {len(writer.acknowledged)} ({before_kill} before Redis was "
            f"killed), refused {writer.refused}, stored {len(stored)}, lost {len(lost)}"
        )
        # no snapshot was taken (fewer writes than snapshot_every_writes): the new replica
        # got every memory, those before the kill included, from Redis's AOF
        assert before_kill > 0 and len(writer.acknowledged) > before_kill
        assert not lost
        assert len(stored) == len(set(stored))
    finally:
        serve.delete(name)
        redis.cleanup()
