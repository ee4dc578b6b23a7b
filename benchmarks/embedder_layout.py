"""Embedder layouts side by side in one run: one replica with 2 torch threads that splits big
batches into a shard per thread (the shipped default), the same replica encoding every batch
as one 2-thread encode, the shipped replica with sentence-transformers' `encode` instead of
its ONNX forward (`embedder.onnx_forward: false`), and two replicas with 1 thread each,
on the embedding-only loads of the comparison benchmark.

    python -m benchmarks.embedder_layout [--seconds 12] [--rounds 2] [--direct-ingress]
        [--layouts 0 2]

Each layout serves the compute-aware graph (`configs/local.yaml` defaults) and gets: 60 lone
requests (p50), unique single texts from 32 clients (req/s), and 32-text requests from 4
clients (texts/s). Rounds alternate the order, so drift on this noisy machine falls on both.
Writes `benchmarks/results/embedder_layout.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.compare import RESULTS, Workload
from benchmarks.serving import served_graph

LAYOUTS = {  # (Mneme args, deployment options) over the shipped defaults
    "1 replica x 2 threads, split": ({}, {}),
    "1 replica x 2 threads, whole": ({"embedder": {"split_min_texts": None}}, {}),
    "1 replica x 2 threads, split, sentence-transformers encode": (
        {"embedder": {"onnx_forward": False}},
        {},
    ),
    "2 replicas x 1 thread": (
        {"embedder": {"torch_threads": 1}},
        {"Embedder": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}},
    ),
}


def measure(workload: Workload, url: str, seconds: float, stream: int) -> dict[str, float]:
    unique = ["--kind", "unique-embed", "--seconds", str(seconds)]
    lone = workload.run(url, "--kind", "unique-embed", "--concurrency", "1",
                        "--max-requests", "60", "--stream", str(stream))  # fmt: skip
    single = workload.run(url, *unique, "--concurrency", "32", "--stream", str(stream + 1))
    batched = workload.run(url, *unique, "--texts-per-request", "32", "--concurrency", "4",
                           "--stream", str(stream + 2))  # fmt: skip
    return {
        "lone_p50_ms": lone["summary"]["p50_ms"],
        "unique_32_clients_rps": single["summary"]["throughput_rps"],
        "texts_32_per_request_texts_per_s": batched["summary"]["throughput_rps"] * 32,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "embedder_layout.json")
    parser.add_argument("--direct-ingress", action="store_true", help="skip Serve's proxy")
    parser.add_argument("--layouts", nargs="+", type=int, metavar="N",
                        help="only these layouts, by number: " + "; ".join(
                            f"{i} {name}" for i, name in enumerate(LAYOUTS)))  # fmt: skip
    args = parser.parse_args(argv)
    names = [list(LAYOUTS)[i] for i in args.layouts] if args.layouts else list(LAYOUTS)
    workload, runs = Workload({}), {name: [] for name in names}
    stream = 300  # fresh texts for every measurement: nothing is a cache hit
    for round_ in range(args.rounds):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            mneme_args, options = LAYOUTS[name]
            with served_graph(mneme_args, options, args.direct_ingress) as url:
                runs[name].append(measure(workload, url, args.seconds, stream))
            stream += 10
            print(name, {k: round(v, 1) for k, v in runs[name][-1].items()}, flush=True)
    medians = {
        name: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for name, rows in runs.items()
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                     "runs": runs, "medians": medians}, indent=1))  # fmt: skip
    for name, figures in medians.items():
        print(f"{name:>24}:", {k: round(v, 1) for k, v in figures.items()})
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
