"""Hit rate of the L1 policy (W-TinyLFU) beside plain LRU and Belady's offline optimum.

    python -m benchmarks.cache_policy [--keys 100000] [--requests 500000] [--capacity 1000]

Replays Zipf-distributed key traces (several skews) at one fixed capacity and prints a table;
`--json PATH` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cache.belady import belady_hit_rate, lru_hit_rate
from cache.policy import TinyLfuCache


def zipf_trace(n_keys: int, n_requests: int, skew: float, seed: int) -> list[int]:
    """Keys ranked by popularity with P(rank r) ~ 1 / r**skew, shuffled key ids."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_keys + 1) ** skew
    ranks = rng.choice(n_keys, size=n_requests, p=weights / weights.sum())
    ids = rng.permutation(n_keys)
    return ids[ranks].tolist()


def static_top_hit_rate(trace: list[int], capacity: int) -> float:
    """Cache the `capacity` most requested keys from the start, knowing the popularity (the
    best any online policy can do on an independent-reference trace; compulsory misses
    counted)."""
    counts = np.bincount(np.asarray(trace))
    top = np.argsort(-counts, kind="stable")[:capacity]
    hits = counts[top].sum() - np.count_nonzero(counts[top])
    return float(hits) / len(trace)


def policy_hit_rate(trace: list[int], capacity: int) -> float:
    cache = TinyLfuCache(capacity, timer=lambda: 0.0)
    hits = 0
    for key in trace:
        if cache.get(key) is not None:
            hits += 1
        else:
            cache.set(key, True, ttl_s=float("inf"))
    return hits / len(trace)


def run(keys: int, requests: int, capacity: int, skews: list[float]) -> list[dict]:
    rows = []
    for skew in skews:
        trace = zipf_trace(keys, requests, skew, seed=int(skew * 100))
        t0 = time.perf_counter()
        ours = policy_hit_rate(trace, capacity)
        ours_s = time.perf_counter() - t0
        lru, best = lru_hit_rate(trace, capacity), belady_hit_rate(trace, capacity)
        top = static_top_hit_rate(trace, capacity)
        rows.append(
            {
                "skew": skew,
                "w_tinylfu": ours,
                "lru": lru,
                "belady": best,
                "static_top_c": top,
                "ours_vs_lru": ours - lru,
                "ours_over_belady": ours / best,
                "policy_ops_per_s": len(trace) / ours_s,
            }
        )
        print(
            f"zipf {skew:>4}: W-TinyLFU {ours:6.1%}  LRU {lru:6.1%}  Belady {best:6.1%}  "
            f"static top-C {top:6.1%}  ours/Belady {ours / best:5.1%}  "
            f"({len(trace) / ours_s:,.0f} ops/s)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--capacity", type=int, default=1_000)
    parser.add_argument("--skews", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2])
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "cache_policy.json",
    )
    args = parser.parse_args()
    print(f"{args.requests:,} requests over {args.keys:,} keys, L1 capacity {args.capacity:,}")
    rows = run(args.keys, args.requests, args.capacity, args.skews)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
