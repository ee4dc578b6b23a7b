"""Prometheus text exposition (format 0.0.4) of the `/v1/stats` document.

Each figure is one replica's, labelled with it: the Router that answered the scrape (its
latencies, its schedulers) and the downstream replica that answered its stats call, and the
cache per shard. Prometheus keeps one series per replica, so a scrape that reaches another
Router (or a restarted replica starting from zero) reads as a series of its own or a counter
reset, never as a counter going backwards; sum over `replica` for the service's figures.
"""

from __future__ import annotations

from typing import Any

QUANTILES = (("p50_ms", "0.5"), ("p95_ms", "0.95"), ("p99_ms", "0.99"))
SCHEDULER_COUNTERS = ("dispatched", "rejected", "expired", "cancelled", "timed_out", "boosted",
                      "preempted")  # fmt: skip
SCHEDULER_GAUGES = ("capacity", "reserved", "in_flight", "waiting", "max_waiting_seen",
                    "mean_service_ms")  # fmt: skip
# a downstream's figures that only grow; its other numbers are gauges
DOWNSTREAM_COUNTERS = frozenset({"batches", "calls", "items", "requests", "completion_tokens",
                                 "busy_s", "dispatched_at_once", "encoded_on_one_thread",
                                 "encodes_split", "encodes_waited"})  # fmt: skip


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _seconds(name: str) -> str:
    """Prometheus's base unit in names: `busy_s` -> `busy_seconds`."""
    return name[:-2] + "_seconds" if name.endswith("_s") else name


class Exposition:
    """Samples grouped by metric family, each family once with its `# TYPE` line."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, list[str]]] = {}

    def add(self, name: str, kind: str, labels: dict[str, Any], value: float, sample: str = ""):
        """`sample`: the sample's own name where it differs from the family's (a summary's
        `_sum` and `_count`)."""
        _, samples = self._families.setdefault(name, (kind, []))
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items() if v is not None)
        samples.append(f"{sample or name}{{{text}}} {float(value)!r}")

    def counter(self, name: str, labels: dict[str, Any], value: float) -> None:
        self.add(f"{name}_total", "counter", labels, value)

    def gauge(self, name: str, labels: dict[str, Any], value: float) -> None:
        self.add(name, "gauge", labels, value)

    def summary(self, name: str, labels: dict[str, Any], figures: dict[str, float]) -> None:
        """A latency summary in ms: quantiles over the window, sum and count over all."""
        for key, quantile in QUANTILES:
            if key in figures:
                self.add(name, "summary", {**labels, "quantile": quantile}, figures[key])
        self.add(name, "summary", labels, figures.get("sum_ms", 0.0), f"{name}_sum")
        self.add(name, "summary", labels, figures.get("count", 0), f"{name}_count")

    def text(self) -> str:
        lines = []
        for name, (kind, samples) in self._families.items():
            lines.append(f"# TYPE {name} {kind}")
            lines += samples
        return "\n".join(lines) + "\n"


def to_prometheus(stats: dict[str, Any]) -> str:
    out = Exposition()
    _router(out, stats.get("router") or {})
    for deployment in ("embedder", "vector_search", "generator"):
        _downstream(out, deployment, stats.get(deployment) or {})
    router_replica = (stats.get("router") or {}).get("replica")
    for downstream, figures in (stats.get("scheduler") or {}).items():
        _scheduler(out, {"downstream": downstream, "replica": router_replica}, figures)
    if stats.get("cache"):
        _cache(out, stats["cache"])
    return out.text()


def _router(out: Exposition, router: dict[str, Any]) -> None:
    replica = {"replica": router.get("replica")}
    for key, figures in router.get("latency", {}).items():
        route, priority, status = (key.split("/") + ["", ""])[:3]
        labels = {"route": route, "priority": priority, "status": status, **replica}
        out.summary("mneme_request_latency_ms", labels, figures)
    for what, figures in router.get("coalesced", {}).items():
        for name in ("calls", "submissions", "items", "sent_alone"):
            if name in figures:
                out.counter(f"mneme_coalesced_{name}", {"what": what, **replica}, figures[name])
    joined = router.get("joined_misses_computed", 0)
    out.counter("mneme_cache_joined_misses_computed", replica, joined)


def _downstream(out: Exposition, deployment: str, figures: dict[str, Any]) -> None:
    labels = {"deployment": deployment, "replica": figures.get("replica")}
    out.gauge("mneme_up", labels, 0 if "error" in figures else 1)
    for key, value in figures.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key in DOWNSTREAM_COUNTERS:
            out.counter(f"mneme_{_seconds(key)}", labels, value)
        else:
            out.gauge(f"mneme_{_seconds(key)}", labels, value)
    for size, count in (figures.get("calls_per_batch") or {}).items():
        out.counter("mneme_batches_by_calls", {**labels, "calls": size}, count)
    for top, count in (figures.get("items_per_batch") or {}).items():
        out.counter("mneme_batches_by_items", {**labels, "items_up_to": top}, count)
    for kind, count in (figures.get("index_kinds") or {}).items():
        out.gauge("mneme_index_namespaces", {**labels, "kind": kind}, count)


def _scheduler(out: Exposition, labels: dict[str, Any], figures: dict[str, Any]) -> None:
    for name in SCHEDULER_GAUGES:
        out.gauge(f"mneme_scheduler_{name}", labels, figures[name])
    for cls, counts in figures["classes"].items():
        per_class = {**labels, "class": cls}
        out.gauge("mneme_scheduler_queued", per_class, counts["queued"])
        for name in SCHEDULER_COUNTERS:
            out.counter(f"mneme_scheduler_{name}", per_class, counts[name])
        out.summary("mneme_scheduler_queue_wait_ms", per_class, counts["queue_wait"])


def _cache(out: Exposition, cache: dict[str, Any]) -> None:
    out.gauge("mneme_cache_shards", {}, cache["shards"])
    out.gauge("mneme_cache_shards_answering", {}, cache["shards_answering"])
    for kind, figures in cache.get("kinds", {}).items():  # over every shard
        out.gauge("mneme_cache_hit_rate", {"kind": kind}, figures["hit_rate"])
        out.gauge("mneme_cache_hit_rate_l1", {"kind": kind}, figures["hit_rate_l1"])
    for shard, figures in cache.get("by_shard", {}).items():
        labels = {"shard": shard}
        for kind, counts in figures["kinds"].items():
            for result, name in (("l1", "hits_l1"), ("l2", "hits_l2"), ("miss", "misses")):
                lookups = {"kind": kind, "result": result, **labels}
                out.counter("mneme_cache_lookups", lookups, counts[name])
            for outcome in ("joined", "outranked"):  # misses another request was computing
                flight = {"kind": kind, "outcome": outcome, **labels}
                out.counter("mneme_cache_single_flight", flight, counts.get(outcome, 0))
        l1 = figures["l1"]
        out.gauge("mneme_cache_l1_entries", labels, l1["entries"])
        out.gauge("mneme_cache_l1_bytes", labels, l1["bytes"])
        out.counter("mneme_cache_l1_evictions", labels, l1["evictions"])
        out.counter("mneme_cache_l1_expirations", labels, l1["expirations"])
        out.gauge("mneme_cache_inflight", labels, figures.get("inflight", 0))
        for result, count in figures["semantic"].items():
            out.counter("mneme_cache_semantic_answers", {"result": result, **labels}, count)
        if l2 := figures.get("l2"):
            out.counter("mneme_cache_l2_errors", labels, l2["errors"])
            skipped = l2.get("skipped_while_open", 0)  # absent from older actors
            out.counter("mneme_cache_l2_skipped_while_open", labels, skipped)
            out.counter("mneme_cache_l2_writes_dropped", labels, l2["writes_dropped"])
            for state in ("closed", "open", "half-open"):
                breaker = {"state": state, **labels}
                out.gauge("mneme_cache_l2_breaker", breaker, int(l2["breaker"] == state))
