"""Priority Router vs FIFO Router at twice the graph's capacity, in one run.

    python -m benchmarks.priority [--seconds 30] [--variants priority no-preemption fifo]
    python -m benchmarks.priority --background-max-tokens 120 --name priority_long_background

The Generator gets a small budget (max_ongoing_requests 5 -> 4 in flight) so the graph
saturates on chat. Steps, for each Router variant (the shipped scheduler, one without
preemption, FIFO; same graph): measure capacity closed-loop; measure critical latency alone;
offer the critical arrivals alone (no background: the floor any scheduler can reach); offer
2x capacity open-loop (Poisson), 80 % background / 20 % critical. Every variant gets the same
offered rate: twice the capacity the first variant measured (capacity readings differ by
about 20 % from run to run, which would otherwise load the variants unequally). Reports critical p95
loaded / unloaded, the longest background wait, background throughput, the rejected share,
preemptions and the most requests the Router's queues held; writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serving import served_graph

RESULTS = Path(__file__).resolve().parent / "results"
MAX_TOKENS = {"critical": 24, "background": 24}  # --background-max-tokens changes the latter
CRITICAL_SHARE = 0.2
GENERATOR = {"Generator": {"max_ongoing_requests": 5}}
VARIANTS = {  # scheduler settings over the shipped defaults (reserve 25 %, preemption on)
    "priority": {"policy": "priority"},
    "no-preemption": {"policy": "priority", "preempt": False},
    "reserve-50": {"policy": "priority", "reserved_share": 0.5},
    "fifo": {"policy": "fifo"},
}


def body(tag: str, max_tokens: int) -> dict:
    return {
        "messages": [{"role": "user", "content": f"{tag} {random.random()}"}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
    }


async def one(client: httpx.AsyncClient, priority: str, t0: float, size: str | None = None) -> dict:
    """One chat of class `priority`, as long as `size`'s (default: its own class's)."""
    sent = time.perf_counter()
    try:
        r = await client.post(
            "/v1/chat/completions",
            json=body(priority, MAX_TOKENS[size or priority]),
            headers={"X-Priority": priority},
        )
        status = r.status_code
        queued_ms = float(r.headers.get("x-queue-wait-ms", "nan"))
    except httpx.HTTPError:
        status, queued_ms = -1, float("nan")
    done = time.perf_counter()
    return {
        "class": priority,
        "sent_s": sent - t0,
        "latency_s": done - sent,
        "queue_wait_s": queued_ms / 1000.0,
        "status": status,
    }


async def capacity(client: httpx.AsyncClient, seconds: float = 8.0) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < stop:
            await one(client, "normal", 0.0, size="background")  # the bulk of the load
            done += 1

    await asyncio.gather(*(worker() for _ in range(8)))
    return done / seconds


async def open_loop(
    client: httpx.AsyncClient, rate: float, seconds: float, critical_share: float, seed: int
) -> tuple[list[dict], int]:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks, at = [], 0.0
    max_waiting = 0
    while at < seconds:
        at += rng.expovariate(rate)
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        priority = "critical" if rng.random() < critical_share else "background"
        tasks.append(asyncio.ensure_future(one(client, priority, t0)))
        if len(tasks) % 10 == 0:
            stats = (await client.get("/v1/stats")).json()["scheduler"]["generator"]
            max_waiting = max(max_waiting, stats["waiting"])
    return list(await asyncio.gather(*tasks)), max_waiting


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95)) if values else float("nan")


async def measure(base_url: str, seconds: float, policy: str, offered: float | None) -> dict:
    """`offered`: the open-loop rate (None: twice the capacity measured here)."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        for _ in range(5):
            await one(client, "normal", 0.0, size="critical")
        cap = await capacity(client)
        alone = [(await one(client, "critical", 0.0))["latency_s"] for _ in range(30)]
        print(
            f"[{policy}] capacity {cap:.1f} req/s; critical alone p95 {p95(alone) * 1000:.0f} ms",
            flush=True,
        )
        offered = offered or 2 * cap
        # the floor any scheduler can reach: the same critical arrivals with no background
        only, _ = await open_loop(client, offered * CRITICAL_SHARE, seconds / 2, 1.0, seed=11)
        floor = p95([r["latency_s"] for r in only if r["status"] == 200])
        print(
            f"[{policy}] critical traffic alone (no background): p95 {floor * 1000:.0f} ms "
            f"({floor / p95(alone):.1f}x a lone request)",
            flush=True,
        )
        rows, max_waiting = await open_loop(client, offered, seconds, CRITICAL_SHARE, seed=7)
        sched = (await client.get("/v1/stats")).json()["scheduler"]["generator"]
    ok = [r for r in rows if r["status"] == 200]
    crit = [r["latency_s"] for r in ok if r["class"] == "critical"]
    bg = [r for r in ok if r["class"] == "background"]
    span = max(r["sent_s"] + r["latency_s"] for r in rows)
    result = {
        "policy": policy,
        "capacity_rps": cap,
        "offered_rps": offered,
        "critical_alone_p95_ms": p95(alone) * 1000,
        "critical_loaded_p95_ms": p95(crit) * 1000,
        "critical_p95_ratio": p95(crit) / p95(alone),
        "critical_without_background_p95_ms": floor * 1000,
        "critical_without_background_ratio": floor / p95(alone),
        # the Router's queue wait (X-Queue-Wait-Ms): what aging bounds; and end to end
        "longest_background_wait_s": max((r["queue_wait_s"] for r in bg), default=float("nan")),
        "longest_background_latency_s": max((r["latency_s"] for r in bg), default=float("nan")),
        "critical_loaded_queue_wait_p95_ms": p95(
            [r["queue_wait_s"] for r in ok if r["class"] == "critical"]
        )
        * 1000,  # fmt: skip
        "background_throughput_rps": len(bg) / span,
        "rejected_share": sum(r["status"] == 503 for r in rows) / len(rows),
        "failed_other": sum(r["status"] not in (200, 503) for r in rows),
        "max_queued_requests": max_waiting,
        "critical_loaded_service_p95_ms": p95(
            [r["latency_s"] - r["queue_wait_s"] for r in ok if r["class"] == "critical"]
        )
        * 1000,  # fmt: skip
        "boosted": sched["classes"].get("background", {}).get("boosted", 0),
        "preempted": sched["classes"].get("background", {}).get("preempted", 0),
        "requests": rows,
    }
    print(
        f"[{policy}] at {offered:.1f} req/s: critical p95 "
        f"{result['critical_loaded_p95_ms']:.0f} ms "
        f"({result['critical_p95_ratio']:.1f}x alone); longest background wait "
        f"{result['longest_background_wait_s']:.1f} s queued "
        f"({result['longest_background_latency_s']:.1f} s end to end); background "
        f"{result['background_throughput_rps']:.1f} req/s; rejected "
        f"{result['rejected_share']:.0%}; queues held <= {max_waiting}",
        flush=True,
    )
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(12, 4), sharey=True)
    for ax, result in zip(axes, results, strict=True):
        for cls, color in (("background", "tab:blue"), ("critical", "tab:red")):
            rows = [r for r in result["requests"] if r["class"] == cls and r["status"] == 200]
            ax.scatter(
                [r["sent_s"] for r in rows],
                [r["latency_s"] for r in rows],
                s=6,
                color=color,
                label=cls,
                alpha=0.6,
            )
        ax.set_title(f"{result['policy']} Router at 2x capacity")
        ax.set_xlabel("time sent (s)")
        ax.set_yscale("log")
        ax.legend()
    axes[0].set_ylabel("latency (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-queued-per-class", type=int, default=64)
    parser.add_argument(
        "--background-max-tokens",
        type=int,
        default=MAX_TOKENS["background"],
        help="longer background generations: what a critical request would otherwise wait for",
    )
    parser.add_argument("--name", default="priority", help="results/<name>.json and .png")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted(VARIANTS),
        default=["priority", "no-preemption", "fifo"],
        help="Routers to compare, in this order (priority: the shipped scheduler defaults)",
    )
    args = parser.parse_args()
    MAX_TOKENS["background"] = args.background_max_tokens
    results = []
    for name in args.variants:
        scheduler = {**VARIANTS[name], "max_queued_per_class": args.max_queued_per_class}
        config = {"cache": {"enabled": False}, "scheduler": scheduler}
        with served_graph(config, GENERATOR) as base_url:
            offered = results[0]["offered_rps"] if results else None  # one load for all
            results.append(asyncio.run(measure(base_url, args.seconds, name, offered)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=1)
    )
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / args.name}.json and .png")


if __name__ == "__main__":
    main()
