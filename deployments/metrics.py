"""Prometheus text exposition of the `/v1/stats` document."""

from __future__ import annotations

from typing import Any


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
    return "\n".join(lines) + "\n"


def _latency(stats: dict[str, Any]):
    for key, summary in stats.get("router", {}).get("latency", {}).items():
        route, _, priority = key.partition("/")
        yield {"route": route, "priority": priority}, summary
