"""Prometheus text exposition of the `/v1/stats` document."""

from __future__ import annotations

from typing import Any

SCHEDULER_COUNTS = ("queued", "dispatched", "rejected", "expired", "cancelled", "timed_out",
                    "boosted", "preempted")  # fmt: skip


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{text}}} {value}" if text else f"{name} {value}"


def to_prometheus(stats: dict[str, Any]) -> str:
    lines: list[str] = []
    for labels, summary in _latency(stats):
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            if key in summary:
                quantile = {"p50_ms": "0.5", "p95_ms": "0.95", "p99_ms": "0.99"}[key]
                lines.append(
                    _sample(
                        "mneme_request_latency_ms", {**labels, "quantile": quantile}, summary[key]
                    )
                )
        lines.append(_sample("mneme_requests_total", labels, summary.get("count", 0)))
    for deployment in ("embedder", "vector_search", "generator"):
        for key, value in (stats.get(deployment) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                lines.append(_sample(f"mneme_{key}", {"deployment": deployment}, value))
    for downstream, sched in (stats.get("scheduler") or {}).items():
        labels = {"downstream": downstream}
        lines.append(_sample("mneme_scheduler_capacity", labels, sched["capacity"]))
        lines.append(_sample("mneme_scheduler_in_flight", labels, sched["in_flight"]))
        for cls, figures in sched["classes"].items():
            for name in SCHEDULER_COUNTS:
                lines.append(
                    _sample(f"mneme_scheduler_{name}", {**labels, "class": cls}, figures[name])
                )
            wait = figures["queue_wait"]
            for key, q in (("p50_ms", "0.5"), ("p95_ms", "0.95"), ("p99_ms", "0.99")):
                if key in wait:
                    lines.append(
                        _sample(
                            "mneme_scheduler_queue_wait_ms",
                            {**labels, "class": cls, "quantile": q},
                            wait[key],
                        )
                    )
    cache = stats.get("cache") or {}
    for kind, figures in cache.get("kinds", {}).items():
        lines.append(_sample("mneme_cache_hit_rate", {"kind": kind}, figures["hit_rate"]))
        for tier, name in (("l1", "hits_l1"), ("l2", "hits_l2"), ("miss", "misses")):
            lines.append(
                _sample("mneme_cache_lookups_total", {"kind": kind, "result": tier}, figures[name])
            )
        for outcome in ("joined", "outranked"):  # misses another request was computing
            labels = {"kind": kind, "outcome": outcome}
            lines.append(_sample("mneme_cache_single_flight_total", labels, figures[outcome]))
    for name, value in (cache.get("l1") or {}).items():
        lines.append(_sample(f"mneme_cache_l1_{name}", {}, value))
    if cache.get("l2"):
        lines.append(_sample("mneme_cache_l2_errors_total", {}, cache["l2"]["errors"]))
        skipped = cache["l2"].get("skipped_while_open", 0)
        lines.append(_sample("mneme_cache_l2_skipped_while_open_total", {}, skipped))
    return "\n".join(lines) + "\n"


def _latency(stats: dict[str, Any]):
    for key, summary in stats.get("router", {}).get("latency", {}).items():
        route, _, priority = key.partition("/")
        yield {"route": route, "priority": priority}, summary
