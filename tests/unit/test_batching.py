"""The adaptive batch window and the gate that admits calls to `@serve.batch`."""

from __future__ import annotations

import pytest

from mneme.batching import AdaptiveWindow, BatchGate
from mneme.config import BatchConfig, MnemeConfig
from mneme.records import BatchStats, items_bucket
from mneme.stats import Occupancy
from tests.clock import Clock


class RecordingBatchMethod:
    """Stands in for a `@serve.batch` method: records the knobs the gate sets on it."""

    def __init__(self) -> None:
        self.max_batch_size = None
        self.timeouts: list[float] = []

    def set_max_batch_size(self, size: int) -> None:
        self.max_batch_size = size

    def set_batch_wait_timeout_s(self, timeout: float) -> None:
        self.timeouts.append(timeout)


def arrivals(window: AdaptiveWindow, clock: Clock, gap_s: float, n: int) -> None:
    for _ in range(n):
        clock.now += gap_s
        window.observe()


def test_window_grows_with_load_up_to_the_maximum():
    clock = Clock()
    window = AdaptiveWindow(clock=clock)
    assert window.window_s(0.05, 32) == 0.0  # nothing seen yet: no reason to wait
    arrivals(window, clock, 0.1, 100)  # 10 calls/s: 0.5 calls per 50 ms window
    slow = window.window_s(0.05, 32)
    arrivals(window, clock, 0.005, 200)  # 200 calls/s: 10 calls per window
    busy = window.window_s(0.05, 32)
    arrivals(window, clock, 0.0005, 400)  # 2000 calls/s: a full batch in 16 ms
    flooded = window.window_s(0.05, 32)
    assert slow == pytest.approx(0.05 * 0.5 / 32, rel=0.05)
    assert busy == pytest.approx(0.05 * 10 / 32, rel=0.05)
    assert slow < busy < flooded == 0.05


def test_gate_runs_a_call_at_once_only_when_the_replica_is_idle():
    clock = Clock()
    method = RecordingBatchMethod()
    gate = BatchGate(method, BatchConfig(max_batch_size=8, batch_wait_timeout_s=0.05), clock)
    assert method.max_batch_size == 8
    with gate.admit() as first:
        clock.now += 0.1  # 10 calls/s: a 50 ms window would collect half a call
        with gate.admit() as second:
            assert (first, second) == (True, False)
            assert gate.active == 2
        assert method.timeouts[-1] < 0.05  # the window was sized from the load
    with gate.admit() as again:
        assert again is True
    assert gate.active == 0 and gate.stats()["dispatched_at_once"] == 2


def test_gate_with_a_fixed_window_never_skips_it():
    method = RecordingBatchMethod()
    gate = BatchGate(method, BatchConfig(batch_wait_timeout_s=0.05, adaptive=False))
    with gate.admit() as at_once:
        assert at_once is False
    assert method.timeouts == [0.05]
    gate.apply(BatchConfig(batch_wait_timeout_s=0.01, adaptive=True))
    assert method.timeouts[-1] == 0.01 and gate.stats()["adaptive"] is True


def test_the_reported_window_is_the_one_a_call_would_get_now():
    clock = Clock()
    gate = BatchGate(RecordingBatchMethod(), BatchConfig(batch_wait_timeout_s=0.05), clock)
    assert gate.stats()["window_ms"] == 0.0  # adaptive, no load yet: no wait, not 50 ms
    for _ in range(50):
        clock.now += 0.001  # 1,000 calls/s: a batch of 32 fills in 32 ms
        with gate.admit():
            pass
    assert 20.0 < gate.stats()["window_ms"] <= 50.0
    gate.apply(BatchConfig(batch_wait_timeout_s=0.05, adaptive=False))
    assert gate.stats()["window_ms"] == 50.0


def test_a_gate_for_event_loop_work_never_skips_the_queue():
    """VectorSearch's gate: its replica looks idle to every call, so none may run alone."""
    assert MnemeConfig().vector_search.batch.adaptive is True
    clock = Clock()
    method = RecordingBatchMethod()
    gate = BatchGate(
        method, BatchConfig(max_batch_size=64, batch_wait_timeout_s=0.002), clock, False
    )
    for _ in range(3):
        clock.now += 0.01  # 100 calls/s: a full window would collect 0.2 calls
        with gate.admit() as at_once:
            assert at_once is False and gate.active == 1
    assert 0.0 < method.timeouts[-1] < 0.002 * 0.01
    assert gate.stats()["dispatched_at_once"] == 0


def test_occupancy_is_time_weighted():
    clock = Clock()
    meter = Occupancy(clock)
    clock.now = 1.0
    meter.enter()  # 1 in flight for 1 s
    clock.now = 2.0
    meter.enter()  # 2 in flight for 1 s
    clock.now = 3.0
    meter.exit()
    meter.exit()
    clock.now = 10.0  # idle
    summary = meter.summary()
    assert summary["busy_s"] == pytest.approx(2.0)
    assert summary["uptime_s"] == pytest.approx(10.0)
    assert summary["mean_in_flight_when_busy"] == pytest.approx(1.5)
    assert summary["in_flight"] == 0


def test_batches_are_counted_by_items_in_powers_of_two():
    stats = BatchStats()
    for items in (1, 2, 3, 4, 5, 32, 33):
        with stats.batch(1, items):
            pass
    assert [items_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert stats.summary()["items_per_batch"] == {1: 1, 2: 1, 4: 2, 8: 1, 32: 1, 64: 1}
