"""The benchmark's headline figures, from phases built by hand."""

from __future__ import annotations

from benchmarks import plots
from benchmarks.compare import peak_qps


def phase(served_rps: float, sent: int, ok: int, cpu_per_1000: float = 10.0) -> dict:
    return {"throughput_rps": served_rps, "sent": sent, "ok": ok, "cpu_s_per_1000": cpu_per_1000}


def test_a_phase_that_turned_requests_away_is_not_a_graphs_capacity():
    """Shedding 30 % (its generations first), a graph serves more of an easier mix: that is
    not the peak of the workload, nor its cost per request at peak."""
    graph = {
        "peak": phase(48.0, 775, 775),
        "open_loop": [
            phase(39.7, 598, 598, cpu_per_1000=39.4),
            phase(54.7, 4188, 2677, cpu_per_1000=33.9),  # 36 % answered 503
        ],
    }
    assert peak_qps(graph) == 48.0
    assert plots.busiest(graph)["cpu_s_per_1000"] == 39.4
    graph["open_loop"][1]["ok"] = 4160  # 99.3 % served: it counts
    assert peak_qps(graph) == 54.7 and plots.busiest(graph)["throughput_rps"] == 54.7


def test_when_no_phase_served_everything_the_best_one_still_counts():
    graph = {"peak": phase(10.0, 100, 50), "open_loop": [phase(12.0, 100, 60)]}
    assert peak_qps(graph) == 12.0
