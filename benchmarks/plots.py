"""Plots of a `benchmarks.compare` results file (also used by notebooks/benchmark.ipynb)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.hit_bound import CACHE_KINDS  # noqa: E402

FIELD_REPORT_HIT_RATES = {"embedding": "73 %", "search": "68 %"}

LABELS = {"naive": "naive", "compute_aware": "compute-aware"}
COLORS = {"naive": "tab:red", "compute_aware": "tab:blue", "peer": "tab:green"}


def latency_cdf(results: dict[str, Any], load_index: int):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, graph in results["graphs"].items():
        phase = graph["open_loop"][load_index]
        q = phase["latency_ms_percentiles"]
        ax.plot(q, [i / 100 for i in range(len(q))], label=LABELS[name], color=COLORS[name])
    rate = results["graphs"]["naive"]["open_loop"][load_index]["offered_rps"]
    ax.set(xscale="log", xlabel="latency (ms, log)", ylabel="share of requests")
    ax.set_title(f"Latency CDF, agents' workload at {rate:.1f} req/s offered")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def throughput_vs_load(results: dict[str, Any]):
    fig, ax = plt.subplots(figsize=(6, 4))
    top = 0.0
    for name, graph in results["graphs"].items():
        offered = [r["offered_rps"] for r in graph["open_loop"]]
        served = [r["throughput_rps"] for r in graph["open_loop"]]
        top = max(top, *offered)
        ax.plot(offered, served, "o-", label=LABELS[name], color=COLORS[name])
        ax.axhline(graph["peak"]["throughput_rps"], color=COLORS[name], ls=":", lw=1)
    ax.plot([0, top], [0, top], color="grey", lw=0.8, label="served = offered")
    ax.set(xlabel="offered load (req/s, Poisson)", ylabel="served (2xx req/s)")
    ax.set_title("Throughput vs offered load (dotted: closed-loop peak)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def hit_rate_over_time(results: dict[str, Any], window: int = 5):
    """Hit rate per cache kind over a sliding window of `window` one-second samples."""
    fig, ax = plt.subplots(figsize=(6, 4))
    samples = results["graphs"]["compute_aware"]["stats_samples"]
    kinds = sorted({k for s in samples for k in (s.get("cache") or {}).get("kinds", {})})
    for kind in kinds:
        xs, ys = [], []
        for prev, cur in zip(samples, samples[window:], strict=False):
            a = cur["cache"]["kinds"].get(kind, {})
            b = prev["cache"]["kinds"].get(kind, {})
            asked = a.get("requests", 0) - b.get("requests", 0)
            if asked > 0:
                hits = a["hits_l1"] + a["hits_l2"] - b.get("hits_l1", 0) - b.get("hits_l2", 0)
                xs.append(cur["t"] - samples[0]["t"])
                ys.append(hits / asked)
        if xs:
            ax.plot(xs, ys, label=kind, lw=1.2)
    ax.set(xlabel="seconds into the agents' workload", ylabel=f"hit rate ({window} s window)")
    ax.set_ylim(0, 1)
    ax.set_title("Compute-aware graph: cache hit rate over time")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def batch_sizes(results: dict[str, Any]):
    """Items (texts, queries) per model or FAISS pass, in powers of two: the Router sends
    merged calls, so calls per batch says little. Results from before `items_per_batch`
    show calls per batch."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, deployment in zip(axes, ("embedder", "vector_search"), strict=True):
        by_items = all(
            "items_per_batch" in g["stats"][deployment] for g in results["graphs"].values()
        )
        key = "items_per_batch" if by_items else "calls_per_batch"
        buckets = sorted(
            {int(k) for g in results["graphs"].values() for k in g["stats"][deployment][key]}
        )
        for name, graph in results["graphs"].items():
            counts = {int(k): v for k, v in graph["stats"][deployment][key].items()}
            total = sum(counts.values()) or 1
            ax.bar(
                [i + (0.2 if name == "naive" else -0.2) for i in range(len(buckets))],
                [counts.get(b, 0) / total for b in buckets],
                width=0.4,
                label=LABELS[name],
                color=COLORS[name],
            )
        labels = [_bucket_label(b, by_items) for b in buckets]
        ax.set_xticks(range(len(buckets)), labels, rotation=45 if len(buckets) > 6 else 0)
        what = "items per batch" if by_items else "calls per batch"
        ax.set(xlabel=what, ylabel="share of batches", title=deployment)
        ax.legend()
    fig.suptitle("Batch sizes over the whole run")
    fig.tight_layout()
    return fig


def _bucket_label(top: int, powers_of_two: bool) -> str:
    """'5-8' for the bucket whose top is 8; a calls-per-batch size as it is."""
    low = top // 2 + 1
    return str(top) if not powers_of_two or low >= top else f"{low}-{top}"


def figures(results: dict[str, Any], load_index: int) -> dict[str, Any]:
    return {
        "compare_latency_cdf.png": latency_cdf(results, load_index),
        "compare_throughput.png": throughput_vs_load(results),
        "compare_hit_rate.png": hit_rate_over_time(results),
        "compare_batch_sizes.png": batch_sizes(results),
    }


def write_all(results: dict[str, Any], folder: Path, load_index: int | None = None) -> list[Path]:
    from benchmarks.compare import COMMON_LOAD, LOAD_FACTORS

    index = LOAD_FACTORS.index(COMMON_LOAD) if load_index is None else load_index
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures(results, index).items():
        fig.savefig(folder / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(folder / name)
    return written


SERVED_ALL = 0.99  # a phase counts toward a graph's capacity only if it served this share


def served_all(phase: dict[str, Any]) -> bool:
    """Whether the phase answered (nearly) every request it was sent with a 2xx. A graph
    that turns requests away (503) serves the cheap ones (naive: its generations queue and
    are shed first), so what it served there is an easier mix than the workload's."""
    return phase["ok"] >= SERVED_ALL * phase["sent"]


def capacity_phases(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The phases that served the whole mix (all of them if none did)."""
    return [p for p in phases if served_all(p)] or phases


def busiest(graph: dict[str, Any]) -> dict[str, Any]:
    """The open-loop phase that served the most of the whole mix: its CPU per request is the
    capacity cost."""
    return max(capacity_phases(graph["open_loop"]), key=lambda phase: phase["throughput_rps"])


def _generations_row(r: dict[str, float]) -> list[tuple[str, str, str, str]]:
    if "generations_per_1000_aware" not in r:  # results from before it was recorded
        return []
    aware, naive = r["generations_per_1000_aware"], r["generations_per_1000_naive"]
    return [
        (
            "LLM generations per 1,000 requests at peak, aware / naive",
            f"{aware / naive:.2f}x",
            f"{aware:.0f} vs {naive:.0f}",
            "",
        )
    ]


def headline_table(results: dict[str, Any]) -> str:
    """The headline ratios as a Markdown table, beside the field report's figures."""
    r = results["ratios"]
    rows = [
        (
            "peak throughput, compute-aware / naive",
            f"{r['peak_qps_ratio']:.1f}x",
            f"{r['peak_qps_aware']:.1f} vs {r['peak_qps_naive']:.1f} req/s",
            "5.6x",
        ),
        (
            f"p95 latency reduction at {r['common_load_rps']:.1f} req/s offered",
            f"{r['p95_reduction']:.0%}",
            f"p50: {r['p50_reduction']:.0%}",
            "80 % (p50: 79 %)",
        ),
        (
            "CPU-seconds per request at each graph's peak, aware / naive",
            f"{r['cost_per_request_ratio_at_peak']:.2f}x",
            f"{r['cpu_s_per_1000_at_peak_aware']:.0f} vs "
            f"{r['cpu_s_per_1000_at_peak_naive']:.0f} CPU-s per 1,000 requests",
            "cost -65 %",
        ),
        (
            "CPU-seconds per request at the common load, aware / naive",
            f"{r['cost_per_request_ratio_common_load']:.2f}x",
            f"idle: {r['idle_cores_aware']:.2f} vs {r['idle_cores_naive']:.2f} cores",
            "",
        ),
        *(
            (
                f"{kind}-cache hit rate (best possible on this trace)",
                f"{r[f'{kind}_hit_rate']:.0%}",
                f"({r[f'{kind}_best_possible']:.0%}); "
                f"{r[f'{kind}_served_without_compute']:.0%} with joined misses",
                FIELD_REPORT_HIT_RATES.get(kind, ""),
            )
            for kind in CACHE_KINDS
            if f"{kind}_hit_rate" in r  # results from before answers' generations were cached
        ),
        *_generations_row(r),
        (
            "Embedder's useful work (texts/s over the offline ceiling), aware / naive",
            f"{r['embedder_useful_share_ratio']:.1f}x",
            f"{r['embedder_useful_share_aware']:.2f} vs {r['embedder_useful_share_naive']:.2f}; "
            f"mean batch {r['mean_embed_batch_aware']:.1f} vs {r['mean_embed_batch_naive']:.0f}",
            "GPU use 28 -> 67 %",
        ),
        (
            "unique single texts, 32 clients: texts/s over no-op Serve req/s",
            f"{r['unique_embed_vs_noop']:.2f}",
            f"{r['unique_embed_texts_per_s_aware']:.0f} texts/s "
            f"(naive {r['unique_embed_texts_per_s_naive']:.0f})",
            "",
        ),
        (
            "32-text requests: texts/s over the offline batched ceiling",
            f"{r['embed_32_texts_vs_ceiling']:.2f}",
            "",
            "",
        ),
        (
            "lone embed p50, adaptive / fixed 50 ms window",
            f"{r['lone_embed_p50_ms_adaptive']:.1f} / {r['lone_embed_p50_ms_fixed']:.1f} ms",
            f"encoding one text alone: {r['lone_encode_ms']:.1f} ms"
            + (
                f" (ONNX forward {r['lone_encode_ms_onnx']:.1f})"
                if "lone_encode_ms_onnx" in r
                else ""
            ),
            "",
        ),
    ]
    if "unique_embed_vs_peer" in r:
        rows.append(
            (
                "unique single texts, 32 clients: compute-aware / Infinity",
                f"{r['unique_embed_vs_peer']:.2f}x",
                f"Infinity's lone p50: {r['lone_embed_p50_ms_peer']:.1f} ms",
                "",
            )
        )
    lines = ["| figure | measured | detail | field report |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def cpu_table(results: dict[str, Any]) -> str:
    """Cores used per role in each graph's busiest open-loop phase, as Markdown."""
    graphs = results["graphs"]
    phases = {name: busiest(graph) for name, graph in graphs.items()}
    roles = sorted({role for phase in phases.values() for role in phase["cpu_s_by_role"]})
    lines = [
        "| cores used by | " + " | ".join(LABELS[n] for n in graphs) + " |",
        "|---|" + "---|" * len(graphs),
    ]
    for role in roles:
        cells = [
            f"{p['cpu_s_by_role'].get(role, 0.0) / p.get('cpu_interval_s', p['wall_s']):.2f}"
            for p in phases.values()
        ]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    served = [f"{p['throughput_rps']:.1f}" for p in phases.values()]
    lines.append("| (served req/s) | " + " | ".join(served) + " |")
    return "\n".join(lines)


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
