"""Priority routing under real Ray Serve: the Generator's budget is 4 in the test app."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from tests.integration.conftest import wait_until

pytestmark = pytest.mark.slow


def generator_scheduler(http) -> dict:
    return http.get("/v1/stats").json()["scheduler"]["generator"]


def wait_for(predicate, timeout_s: float = 30.0) -> None:
    """Polled often: the tests catch short-lived states (a slot held, a request queued)."""
    wait_until(predicate, timeout_s, interval_s=0.05)


def chat(served, priority: str, max_tokens: int, timeout: float = 120.0) -> httpx.Response:
    with served.client(timeout=timeout) as c:
        return c.post(
            "/v1/chat/completions",
            headers={"X-Priority": priority},
            json={
                "messages": [{"role": "user", "content": f"{priority} work"}],
                "max_tokens": max_tokens,
                "temperature": 1.0,  # sampled: never a cache hit
            },
        )


def test_budget_follows_the_deployment(http):
    wait_for(lambda: generator_scheduler(http)["capacity"] == 4)


def test_critical_is_dispatched_ahead_of_queued_background(served, http):
    wait_for(lambda: generator_scheduler(http)["capacity"] == 4)
    finished: dict[str, float] = {}
    lock = threading.Lock()

    def background(i: int) -> int:
        r = chat(served, "background", 128)
        with lock:
            finished[f"bg{i}"] = time.monotonic()
        return r.status_code

    with ThreadPoolExecutor(max_workers=16) as pool:
        futures = [pool.submit(background, i) for i in range(16)]
        wait_for(lambda: generator_scheduler(http)["waiting"] >= 6)
        queued = generator_scheduler(http)["waiting"]
        critical = chat(served, "critical", 8)
        critical_done = time.monotonic()
        statuses = [f.result() for f in futures]
    assert critical.status_code == 200 and statuses == [200] * 16
    after = sum(1 for t in finished.values() if t > critical_done)
    # what was still queued when it arrived finished after it (a few may have been dispatched
    # between our look at the queue and its arrival); FIFO would give 0
    assert after >= queued - 3, (after, queued)
    classes = generator_scheduler(http)["classes"]
    assert classes["critical"]["dispatched"] >= 1
    assert (
        classes["background"]["queue_wait"]["p95_ms"] > classes["critical"]["queue_wait"]["p50_ms"]
    )


@contextmanager
def generator_busy(served, http) -> Iterator[None]:
    """8 long `high` chats: 4 hold the budget, the rest queue; all succeed afterwards."""
    wait_for(lambda: generator_scheduler(http)["capacity"] == 4)
    with ThreadPoolExecutor(max_workers=8) as pool:
        busy = [pool.submit(chat, served, "high", 128) for _ in range(8)]
        wait_for(lambda: generator_scheduler(http)["waiting"] >= 2)
        yield
        assert all(f.result().status_code == 200 for f in busy)


def test_a_disconnected_client_cancels_its_queued_work(served, http):
    before = generator_scheduler(http)["classes"].get("low", {}).get("cancelled", 0)
    with generator_busy(served, http), pytest.raises(httpx.TimeoutException):
        chat(served, "low", 8, timeout=0.3)  # gives up while queued behind `high`
    wait_for(lambda: generator_scheduler(http)["classes"]["low"]["cancelled"] > before, 10)
    assert generator_scheduler(http)["in_flight"] == 0


def test_a_deadline_that_passes_in_the_queue_is_504_never_computed(served, http):
    before = generator_scheduler(http)["classes"].get("normal", {}).get("expired", 0)
    with generator_busy(served, http):
        r = http.post(
            "/v1/chat/completions",
            headers={"X-Deadline-Ms": "150"},
            json={
                "messages": [{"role": "user", "content": "late"}],
                "max_tokens": 4,
                "temperature": 1.0,
            },
        )
    assert r.status_code in (503, 504), r.text
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) >= 1
    classes = generator_scheduler(http)["classes"]["normal"]
    assert classes["expired"] + classes["rejected"] > before


def test_a_critical_request_preempts_a_long_background_generation(served, http):
    """The budget is full: three long background chats (all background may hold) and a long
    `high` one in the reserved slot. A critical chat takes the newest background one's slot at
    once; that chat is generated again afterwards and still succeeds."""
    wait_for(lambda: generator_scheduler(http)["capacity"] == 4)
    classes = generator_scheduler(http)["classes"]
    before = classes.get("background", {}).get("preempted", 0)
    with ThreadPoolExecutor(max_workers=4) as pool:
        background = [pool.submit(chat, served, "background", 256) for _ in range(3)]
        wait_for(lambda: generator_scheduler(http)["in_flight"] == 3)
        high = pool.submit(chat, served, "high", 256)
        wait_for(lambda: generator_scheduler(http)["in_flight"] == 4)
        started = time.monotonic()
        critical = chat(served, "critical", 8)
        critical_s = time.monotonic() - started
        still_running = sum(not f.done() for f in background)
        statuses = [f.result().status_code for f in [high, *background]]
    assert critical.status_code == 200 and statuses == [200] * 4
    # it did not wait for a 256-token generation to end: they were all still running
    assert still_running == 3, (still_running, critical_s)
    assert float(critical.headers["x-queue-wait-ms"]) < 1000
    after = generator_scheduler(http)["classes"]["background"]["preempted"]
    assert after == before + 1


def test_a_critical_request_does_not_wait_for_a_queued_background_one_asking_the_same(served, http):
    """Single flight has the critical chat join the identical background chat that owns its
    cache miss; it waits for it only `cache.hedge_after_ms` (100 ms), not the background
    one's whole queue, and is then generated ahead of that queue. Both get the same answer."""
    body = {
        "messages": [{"role": "user", "content": f"same question {time.monotonic_ns()}"}],
        "max_tokens": 8,
        "temperature": 0,  # cacheable: one cache key for both
    }

    def ask(priority: str) -> httpx.Response:
        with served.client(timeout=120.0) as c:
            return c.post("/v1/chat/completions", headers={"X-Priority": priority}, json=body)

    before = http.get("/v1/stats").json()
    outranked = before["cache"]["kinds"].get("chat", {}).get("outranked", 0)
    hedged = before["router"]["joined_misses_computed"]
    with generator_busy(served, http), ThreadPoolExecutor(max_workers=1) as pool:
        queued = generator_scheduler(http)["waiting"]
        background = pool.submit(ask, "background")
        wait_for(lambda: generator_scheduler(http)["waiting"] > queued)  # it owns the miss
        critical = ask("critical")
        background_was_done = background.done()
        assert background.result().status_code == 200
    assert critical.status_code == 200, critical.text
    assert not background_was_done  # still queued behind `high` when the critical one ended
    text = critical.json()["choices"][0]["message"]["content"]
    assert background.result().json()["choices"][0]["message"]["content"] == text
    after = http.get("/v1/stats").json()
    assert after["cache"]["kinds"]["chat"]["outranked"] == outranked + 1
    assert after["router"]["joined_misses_computed"] == hedged + 1  # computed, not woken


def generator_stats(http) -> dict:
    return http.get("/v1/stats").json()["generator"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_client_that_leaves_mid_generation_stops_it_in_vllm(served, http, stream):
    """The Router cancels the Generator call of a request whose client disconnected, and
    vLLM aborts the sequence: it stops adding tokens. The same request left to finish shows
    how many it would have generated (sampled without a seed: never a cache hit)."""
    body = {
        "messages": [{"role": "user", "content": "tell me everything"}],
        "max_tokens": 400,
        "temperature": 1.0,
        "stream": stream,
    }

    def send(leave_after_s: float | None) -> None:
        with served.client(timeout=120.0) as c:
            if stream:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    assert r.status_code == 200
                    started = time.monotonic()
                    for _ in r.iter_raw():  # leaving the block closes the connection
                        if leave_after_s and time.monotonic() - started > leave_after_s:
                            return
                return
            try:
                c.post("/v1/chat/completions", json=body, timeout=leave_after_s or 120.0)
            except httpx.TimeoutException:
                pass  # the client gives up: its connection closes

    def tokens_generated(leave_after_s: float | None) -> int:
        wait_for(lambda: generator_stats(http)["in_flight"] == 0)
        before = generator_stats(http)["completion_tokens"]
        send(leave_after_s)
        wait_for(lambda: generator_stats(http)["in_flight"] == 0)
        return generator_stats(http)["completion_tokens"] - before

    whole = tokens_generated(None)
    assert whole >= 200, whole  # long enough that a stop shows
    left = tokens_generated(0.1)
    assert left < whole / 2, (left, whole)
