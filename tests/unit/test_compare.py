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


def graph_stats(items_per_batch: dict | None) -> dict:
    figures = {"calls_per_batch": {"1": 10}}
    if items_per_batch is not None:
        figures["items_per_batch"] = items_per_batch
    return {"stats": {"embedder": figures, "vector_search": figures}}


def test_the_batch_plot_counts_items_per_pass_where_the_results_have_them():
    """Merged calls are one call of many texts: by calls, both graphs would read as batches
    of 1. Results from before `items_per_batch` still plot, by calls."""
    results = {
        "graphs": {
            "naive": graph_stats({"1": 10}),
            "compute_aware": graph_stats({"1": 2, "8": 5, "32": 3}),
        }
    }
    ax = plots.batch_sizes(results).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5-8", "17-32"]
    assert ax.get_xlabel() == "items per batch"
    aware = [bar.get_height() for bar in ax.containers[1]]
    assert aware == [0.2, 0.5, 0.3]
    old = {"graphs": {"naive": graph_stats(None), "compute_aware": graph_stats(None)}}
    assert plots.batch_sizes(old).axes[0].get_xlabel() == "calls per batch"
