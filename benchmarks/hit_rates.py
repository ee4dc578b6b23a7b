"""Cache hit rates through the served graph, beside the best any cache could do on each trace.

    python -m benchmarks.hit_rates [--seconds 20] [--concurrency 16] [--direct-ingress]

A hit rate means little without the trace: adds bump a namespace's version (its cached
searches and answers start over) and a first-time question misses in any cache. So for each
trace in `TRACES` a fresh compute-aware graph (`configs/local.yaml`) gets the memory corpora,
a warm-up and then the measured phase, closed loop, from `benchmarks.workload` in a second
process; the hit rates come from `/v1/stats` over the measured phase, and the best possible
from replaying the requests actually sent (warm-up included, not counted) through the
Router's lookup structure with a clairvoyant cache of the same size (`benchmarks.hit_bound`).

- `default`: the agents' trace of `benchmarks.compare` (2 % of requests add a memory).
- `read_heavy`: agents that mostly read (one add in 500 requests) over 8 namespaces and a
  pool of 200 questions, a trace whose repeats allow the field report's hit rates.

Writes `benchmarks/results/hit_rates.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.compare import Workload, cache_delta
from benchmarks.hit_bound import CACHE_KINDS, best_hit_rates_of_run
from benchmarks.serving import served_app
from benchmarks.workload import WorkloadSpec, answer_memories

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "local.yaml"
TRACES: dict[str, dict[str, Any]] = {
    "default": {},
    "read_heavy": {
        "namespaces": 8,
        "query_pool": 200,
        "mix": {"embed": 0.2, "search": 0.5, "answer": 0.25, "add": 0.002},
    },
}
WARM_UP_STREAM, MEASURED_STREAM = 9, 10


def summary(cache: dict[str, dict], best: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per kind: the measured hit rate, the rate served without compute (hits and misses
    joined to a computation in flight), the best possible, and the gap in points."""
    out = {}
    for kind in CACHE_KINDS:
        if kind not in cache or kind not in best:
            continue
        hit, served = cache[kind]["hit_rate"], cache[kind]["served_without_compute"]
        bound = best[kind]["best_hit_rate"]
        out[kind] = {
            "hit_rate": hit,
            "served_without_compute": served,
            "best_possible": bound,
            "gap_points": 100 * (bound - hit),
            "gap_points_with_joined": 100 * (bound - served),
        }
    return out


def measure_trace(
    name: str, spec: dict[str, Any], seconds: float, concurrency: int, direct: bool, step
) -> dict[str, Any]:
    from graphs.serve_yaml import read_serve_yaml

    [app] = read_serve_yaml(CONFIG)
    run = Workload(spec).run
    closed = ["--mode", "closed", "--concurrency", str(concurrency), "--seconds", str(seconds)]
    step(f"{name}: starting Ray Serve and vLLM")
    with (
        tempfile.TemporaryDirectory(prefix=f"mneme-hits-{name}-") as data_dir,
        served_app(app.with_data_dir(data_dir).bind, direct_ingress=direct) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        step(f"{name}: adding the memory corpora")
        run(url, "--seed-corpus", "--max-requests", "0")
        step(f"{name}: warm-up (not counted)")
        warm_run = run(url, *closed, "--stream", str(WARM_UP_STREAM))
        before = http.get("/v1/stats").json()
        step(f"{name}: measured phase")
        measured_run = run(url, *closed, "--stream", str(MEASURED_STREAM))
        cache = cache_delta(before, http.get("/v1/stats").json())
    warm, measured = warm_run["summary"], measured_run["summary"]
    workload = WorkloadSpec(**spec)
    best = best_hit_rates_of_run(
        workload,
        [(MEASURED_STREAM, measured["sent"])],
        app.config.cache.max_entries,
        warm_up=[(WARM_UP_STREAM, warm["sent"])],
        memories=answer_memories(WARM_UP_STREAM, warm_run["outcomes"])
        | answer_memories(MEASURED_STREAM, measured_run["outcomes"]),
    )
    return {
        "spec": workload.__dict__,
        "requests": measured["sent"],
        "throughput_rps": measured["throughput_rps"],
        "statuses": measured["statuses"],
        "cache": cache,
        "best_possible": best,
        "summary": summary(cache, best),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="warm-up and measured phase")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--traces", nargs="+", choices=list(TRACES), default=list(TRACES))
    parser.add_argument("--direct-ingress", action="store_true", help="clients call the Router")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/hit_rates.json")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "command": "python -m benchmarks.hit_rates " + " ".join(argv or sys.argv[1:]),
        "traces": {},
    }
    with tqdm(total=4 * len(args.traces), unit="step", file=sys.stderr) as progress:

        def step(what: str) -> None:
            progress.set_description(what)
            progress.update(1)

        for name in args.traces:
            results["traces"][name] = measure_trace(
                name, TRACES[name], args.seconds, args.concurrency, args.direct_ingress, step
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    for name, trace in results["traces"].items():
        for kind, row in trace["summary"].items():
            print(
                f"{name:>10} {kind:>9}: hits {row['hit_rate']:.1%}, with joined misses "
                f"{row['served_without_compute']:.1%}, best possible {row['best_possible']:.1%}"
            )
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
