"""Compute-aware vs naive, side by side in one run, with the peer and the offline ceiling.

    python -m benchmarks.compare [--seconds 15] [--no-peer] [--direct-ingress | --haproxy]
                                 [--json ...]

One process run measures, in order (a progress bar shows where it is):
1. the offline ceiling: sentence-transformers `encode` of unique texts in batches of 64, and
   the encode time of one text, in this process before Ray starts; the same with the
   Embedder's ONNX forward (`mneme.onnx_encoder`: batches on 2 threads, one text on 1, as
   the Embedder runs them);
2. each graph from its shipped YAML (`configs/naive.yaml`, then `configs/local.yaml`), served
   with Serve's no-op ingress beside it, the load sent by `benchmarks.workload` from a second
   process: lone-request embed latency (and, on the compute-aware graph, the same with a
   fixed 50 ms window), unique single-text embeds from 32 clients (and the no-op path the
   same way), 32-text requests, the agents' workload closed-loop (peak throughput) and then
   open-loop at the same offered rates for both graphs (throughput and latency vs load, CPU
   seconds per 1,000 requests, busy share of each model replica), sampling `/v1/stats` every
   second for hit rates over time;
3. the peer, Infinity, serving the same MiniLM folder (`benchmarks.peer`), the same way.

Writes `benchmarks/results/compare.json` and the PNG plots beside it (`benchmarks.plots`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from tqdm import tqdm

from benchmarks import plots
from benchmarks.hit_bound import CACHE_KINDS, best_hit_rates_of_run
from benchmarks.serving import ingress_url, served_app
from benchmarks.workload import UniqueTexts, WorkloadSpec, answer_memories

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GRAPHS = {
    "naive": ROOT / "configs" / "naive.yaml",
    "compute_aware": ROOT / "configs" / "local.yaml",
}
TRANSPORTS = {(False, False): "proxy", (True, False): "direct ingress", (False, True): "haproxy"}
# open-loop rates, as multiples of naive's closed-loop peak: the last is past the 8x target,
# so the ladder never caps the ratio a run can show
LOAD_FACTORS = (0.5, 0.8, 1.5, 3.0, 6.0, 9.0)
COMMON_LOAD = 0.8  # the factor at which p50/p95 are compared
SAMPLE_S = 1.0
ROUNDS = 3  # of each embedding-throughput phase; the median round is reported
LONE_REQUESTS = 80


class Workload:
    """Runs `benchmarks.workload` as a second process and returns its JSON."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.pid: int | None = None

    def run(self, url: str, *args: str) -> dict[str, Any]:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            cmd = [sys.executable, "-m", "benchmarks.workload", "--url", url]
            cmd += ["--spec", json.dumps(self.spec), "--out", out.name, *args]
            proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
            self.pid = proc.pid
            _, err = proc.communicate()
            self.pid = None
            if proc.returncode != 0:
                raise RuntimeError(f"workload failed ({proc.returncode}): {err[-2000:]}")
            return json.loads(Path(out.name).read_text())


class CpuMeter:
    """CPU seconds used by the serving processes: every descendant of this process (Ray's
    GCS, raylet, replicas, vLLM's engine processes) but the load generator, by role."""

    ROLES = ("ProxyActor", "Router", "Embedder", "VectorSearch", "Generator", "CacheShard")

    def __init__(self, workload: Workload):
        self._workload = workload
        self._last: dict[int, tuple[str, float]] = {}
        self._started = time.monotonic()
        self.interval_s = 0.0

    @classmethod
    def _own_role(cls, proc: psutil.Process) -> str | None:
        line = " ".join(proc.cmdline())
        if "VLLM" in line or "EngineCore" in line:
            return "Generator"
        return next((role for role in cls.ROLES if role in line), None)

    @classmethod
    def _role(cls, proc: psutil.Process) -> str:
        """Replicas by deployment, and a process by the replica it runs under (vLLM's engine
        is the Generator's even while its process title is not yet set); up to this process,
        whose own parents are no replica."""
        for process in (proc, *proc.parents()):
            if process.pid == os.getpid():
                break
            role = cls._own_role(process)
            if role is not None:
                return role
        return "other (Ray, controller)"

    def _sample(self) -> dict[int, tuple[str, float]]:
        out = {}
        for proc in psutil.Process().children(recursive=True):
            if proc.pid == self._workload.pid:
                continue
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[proc.pid] = (self._role(proc), t.user + t.system)
        return out

    def start(self) -> None:
        self._last = self._sample()
        self._started = time.monotonic()
        self.interval_s = 0.0

    def seconds_by_role(self) -> dict[str, float]:
        """CPU seconds by role since `start`; `interval_s` is then the wall time they cover
        (the load generator's start and exit included, not only its measured window)."""
        by_role: dict[str, float] = {}
        for pid, (role, cpu) in self._sample().items():
            by_role[role] = by_role.get(role, 0.0) + cpu - self._last.get(pid, (role, 0.0))[1]
        self.interval_s = time.monotonic() - self._started
        return by_role

    def idle_cores(self, seconds: float = 5.0) -> dict[str, float]:
        """Cores the graph uses with no load at all (engine loops, health checks, ...)."""
        self.start()
        time.sleep(seconds)
        return {role: cpu / seconds for role, cpu in self.seconds_by_role().items()}


class StatsSampler:
    """Polls `/v1/stats` every second while a phase runs (hit rates over time)."""

    def __init__(self, http: httpx.Client):
        self._http = http
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def take(self) -> dict[str, Any]:
        return self._http.get("/v1/stats").json()

    def _loop(self, phase: str) -> None:
        while not self._stop.wait(SAMPLE_S):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                kinds = (self.take().get("cache") or {}).get("kinds", {})
                t = time.monotonic() - self._t0
                self.samples.append({"t": t, "phase": phase, "cache": {"kinds": kinds}})

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(phase,), daemon=True)
        self._thread.start()
        try:
            yield
        finally:
            self._stop.set()
            self._thread.join()


def offline_ceiling(texts: list[str], lone: int = 30) -> dict[str, float]:
    """sentence-transformers in this process: batched texts/s and one text's encode time, with
    `encode` (the ceiling the targets name) and with the Embedder's ONNX forward."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from mneme.config import EmbedderConfig
    from mneme.onnx_encoder import OnnxEncoder

    model = SentenceTransformer(EmbedderConfig().resolved_model_path(), device="cpu")
    onnx = OnnxEncoder(model, batch_size=64, threads_options=(1, 2))
    st = lambda batch: model.encode(batch, batch_size=64, normalize_embeddings=True)  # noqa: E731
    encoders = {"": (st, st), "onnx_": (lambda batch: onnx.encode(batch, 2), onnx.encode)}
    out = {}
    for prefix, (encode, encode_one) in encoders.items():
        encode(texts[:64])  # warm up
        start = time.perf_counter()
        encode(texts)
        out[f"{prefix}batched_texts_per_s"] = len(texts) / (time.perf_counter() - start)
        singles = []
        for text in texts[:lone]:
            t = time.perf_counter()
            encode_one([text])
            singles.append(time.perf_counter() - t)
        out[f"{prefix}lone_encode_ms"] = float(np.median(singles)) * 1000
    return out


def unique_texts(n: int) -> list[str]:
    texts = UniqueTexts("/", 1, stream=999)
    return [next(texts).body["input"] for _ in range(n)]


def replica_use(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Busy share and work done per model replica between two `/v1/stats` snapshots."""
    out = {}
    for name in ("embedder", "vector_search", "generator"):
        b, a = before.get(name, {}), after.get(name, {})
        wall = a.get("uptime_s", 0) - b.get("uptime_s", 0)
        if wall <= 0:
            continue
        row = {"wall_s": wall, "busy_share": (a["busy_s"] - b["busy_s"]) / wall}
        if "items" in a:
            items = a["items"] - b["items"]
            batches = a["batches"] - b["batches"]
            row |= {"items_per_s": items / wall, "mean_batch": items / batches if batches else 0}
        if "requests" in a:  # the Generator: generations started
            row["requests"] = a["requests"] - b["requests"]
        if "mean_in_flight_when_busy" in a:
            row["mean_in_flight_when_busy"] = a["mean_in_flight_when_busy"]
        out[name] = row
    return out


def cache_delta(before: dict, after: dict) -> dict[str, dict[str, float]]:
    kinds_b = (before.get("cache") or {}).get("kinds", {})
    out = {}
    for kind, a in ((after.get("cache") or {}).get("kinds", {})).items():
        b = kinds_b.get(kind, {})
        d = {k: a[k] - b.get(k, 0) for k in ("hits_l1", "hits_l2", "misses", "joined", "requests")}
        if d["requests"]:
            d["hit_rate"] = (d["hits_l1"] + d["hits_l2"]) / d["requests"]
            d["served_without_compute"] = (d["hits_l1"] + d["hits_l2"] + d["joined"]) / d[
                "requests"
            ]
            out[kind] = d
    return out


class Bench:
    def __init__(
        self,
        seconds: float,
        spec: dict[str, Any],
        progress: tqdm,
        direct: bool = False,
        haproxy: bool = False,
    ):
        self.direct = direct  # clients call the Router replica's own port, not the proxy
        self.haproxy = haproxy  # clients call HAProxy, which forwards to that port
        self.seconds = seconds
        self.round_seconds = max(2.0, round(seconds * 2 / 3, 1))  # ROUNDS of them per figure
        self.spec = spec
        self.workload = Workload(spec)
        self.progress = progress
        self.results: dict[str, Any] = {"spec": WorkloadSpec(**spec).__dict__, "graphs": {}}

    def step(self, what: str) -> None:
        self.progress.set_description(what)
        self.progress.update(1)

    def measure_graph(self, name: str, rates: list[float] | None) -> dict[str, Any]:
        from graphs.serve_yaml import read_serve_yaml

        [app] = read_serve_yaml(GRAPHS[name])
        out: dict[str, Any] = {"config": str(GRAPHS[name].relative_to(ROOT))}
        run = self.workload.run
        secs, rsecs = str(self.seconds), str(self.round_seconds)
        self.step(f"{name}: starting Ray Serve and vLLM")
        with (
            tempfile.TemporaryDirectory(prefix=f"mneme-{name}-") as data_dir,  # starts empty
            served_app(
                app.with_data_dir(data_dir).bind, direct_ingress=self.direct, haproxy=self.haproxy
            ) as url,
            httpx.Client(base_url=url, timeout=60) as http,
        ):
            sampler = StatsSampler(http)
            cpu = CpuMeter(self.workload)
            out["idle_cores"] = cpu.idle_cores()
            self.step(f"{name}: adding the memory corpora")
            out["seed"] = run(url, "--seed-corpus", "--max-requests", "0")["seeded_memories"]
            self.step(f"{name}: lone-request latency")
            lone = ["--kind", "unique-embed", "--concurrency", "1"]
            lone += ["--max-requests", str(LONE_REQUESTS)]
            out["lone_embed"] = run(url, *lone, "--stream", "1")["summary"]
            if name == "compute_aware":
                out["lone_embed_fixed_window"] = self._fixed_window(url, lambda: run(url, *lone))
                self.step("no-op Serve path: 32 clients")
                noop = ["--kind", "unique-embed", "--path", "/noop/v1/embeddings"]
                noop_url = ingress_url("noop", url)
                self.results["noop"] = self.rounds(
                    lambda i: run(noop_url, *noop, "--seconds", rsecs, "--stream", str(i))
                )
            self.step(f"{name}: unique texts, 32 clients")
            unique = ["--kind", "unique-embed", "--concurrency", "32", "--seconds", rsecs]
            out["unique_embed_32"] = self.rounds(
                lambda i: run(url, *unique, "--stream", str(2 + 100 * i)), sampler
            )
            self.step(f"{name}: 32-text requests")
            batched = ["--kind", "unique-embed", "--texts-per-request", "32", "--concurrency", "4"]
            summary = self.rounds(
                lambda i: run(url, *batched, "--seconds", rsecs, "--stream", str(3 + 100 * i))
            )
            summary["texts_per_s"] = summary["throughput_rps"] * 32
            out["embed_32_texts"] = summary

            self.step(f"{name}: agents' workload, warm-up (not measured)")
            warm = run(url, "--mode", "closed", "--concurrency", "32", "--seconds", secs,
                       "--stream", "9")  # fmt: skip
            warm_up = [(9, warm["summary"]["sent"])]
            sent: list[tuple[int, int]] = []  # (trace stream, requests sent), in order
            memories = answer_memories(9, warm["outcomes"])  # what each answer was given
            stats_before = sampler.take()
            self.step(f"{name}: agents' workload, closed loop (peak)")
            with sampler.during("peak"):
                peak = run(url, "--mode", "closed", "--concurrency", "32", "--seconds", secs,
                           "--stream", "10")  # fmt: skip
            sent.append((10, peak["summary"]["sent"]))
            memories |= answer_memories(10, peak["outcomes"])
            out["peak"] = peak["summary"]
            out["peak"]["replicas"] = replica_use(stats_before, sampler.take())
            if rates is None:
                rates = [f * out["peak"]["throughput_rps"] for f in LOAD_FACTORS]
            out["open_loop"] = []
            for i, rate in enumerate(rates):
                self.step(f"{name}: open loop at {rate:.1f} req/s")
                before = sampler.take()
                cpu.start()
                with sampler.during(f"open {rate:.1f}/s"):
                    result = run(url, "--mode", "open", "--rate", f"{rate:.3f}",
                                 "--seconds", secs, "--stream", str(20 + i))  # fmt: skip
                by_role = cpu.seconds_by_role()
                cpu_s = sum(by_role.values())
                summary = result["summary"] | {"offered_rps": rate, "cpu_s": cpu_s}
                summary["cpu_interval_s"] = cpu.interval_s  # cores = cpu_s / this
                summary["cpu_s_by_role"] = by_role
                summary["cpu_s_per_1000"] = 1000 * cpu_s / max(summary["ok"], 1)
                summary["replicas"] = replica_use(before, sampler.take())
                out["open_loop"].append(summary)
                sent.append((20 + i, summary["sent"]))
                memories |= answer_memories(20 + i, result["outcomes"])
            stats_after = sampler.take()
            out["cache"] = cache_delta(stats_before, stats_after)
            out["best_possible"] = best_hit_rates_of_run(
                WorkloadSpec(**self.spec), sent, app.config.cache.max_entries, warm_up, memories
            )
            out["stats_samples"] = sampler.samples
            out["stats"] = stats_after
        return out | {"rates": rates}

    def rounds(self, measure, sampler: StatsSampler | None = None) -> dict[str, Any]:
        """`measure(i)` (a workload run) `ROUNDS` times: the summary of the round with the
        median throughput (with the replicas' use during it, given `sampler`) and every
        round's throughput. One short phase swings by 10-20 % here; a median of three less."""
        runs = []
        for i in range(ROUNDS):
            before = sampler.take() if sampler else None
            summary = measure(i)["summary"]
            if sampler:
                summary["replicas"] = replica_use(before, sampler.take())
            runs.append(summary)
        median = sorted(runs, key=lambda r: r["throughput_rps"])[len(runs) // 2]
        return median | {"rounds_rps": [r["throughput_rps"] for r in runs]}

    def _fixed_window(self, url: str, measure) -> dict[str, Any]:
        from ray import serve

        handle = serve.get_deployment_handle("Embedder", app_name="mneme")
        handle.reconfigure.remote({"adaptive": False}).result()
        try:
            return measure()["summary"]
        finally:
            handle.reconfigure.remote(None).result()

    def measure_peer(self) -> dict[str, Any]:
        from benchmarks.peer import SERVED_MODEL, ensure_infinity_venv, infinity_server
        from mneme.config import EmbedderConfig

        self.step("peer: installing Infinity (first run only)")
        ensure_infinity_venv(ROOT)
        self.step("peer: Infinity, lone requests and 32 clients")
        with infinity_server(EmbedderConfig().resolved_model_path()) as url:
            base = ["--kind", "unique-embed", "--path", "/embeddings", "--model", SERVED_MODEL]
            run = self.workload.run
            lone = run(url, *base, "--concurrency", "1", "--max-requests", str(LONE_REQUESTS))
            rsecs = str(self.round_seconds)
            return {
                "lone_embed": lone["summary"],
                "unique_embed_32": self.rounds(
                    lambda i: run(url, *base, "--seconds", rsecs, "--stream", str(2 + 100 * i))
                ),
            }


def ratios(results: dict[str, Any]) -> dict[str, float]:
    """The headline figures, each a ratio measured within this run."""
    naive, aware = results["graphs"]["naive"], results["graphs"]["compute_aware"]
    common = LOAD_FACTORS.index(COMMON_LOAD)
    n_open, a_open = naive["open_loop"][common], aware["open_loop"][common]
    best_peak, naive_peak = peak_qps(aware), peak_qps(naive)
    out = {
        "peak_qps_aware": best_peak,
        "peak_qps_naive": naive_peak,
        "peak_qps_ratio": best_peak / naive_peak,
        "common_load_rps": n_open["offered_rps"],
        "p50_reduction": 1 - a_open["p50_ms"] / n_open["p50_ms"],
        "p95_reduction": 1 - a_open["p95_ms"] / n_open["p95_ms"],
        "cost_per_request_ratio_common_load": a_open["cpu_s_per_1000"] / n_open["cpu_s_per_1000"],
        "cost_per_request_ratio_at_peak": plots.busiest(aware)["cpu_s_per_1000"]
        / plots.busiest(naive)["cpu_s_per_1000"],
        "cpu_s_per_1000_at_peak_aware": plots.busiest(aware)["cpu_s_per_1000"],
        "cpu_s_per_1000_at_peak_naive": plots.busiest(naive)["cpu_s_per_1000"],
        "idle_cores_aware": sum(aware["idle_cores"].values()),
        "idle_cores_naive": sum(naive["idle_cores"].values()),
    }
    generations = generations_per_1000(aware["peak"]), generations_per_1000(naive["peak"])
    if None not in generations:
        out["generations_per_1000_aware"], out["generations_per_1000_naive"] = generations
    for kind in CACHE_KINDS:
        served, best = aware["cache"].get(kind, {}), aware["best_possible"].get(kind, {})
        out[f"{kind}_hit_rate"] = served.get("hit_rate", 0.0)
        out[f"{kind}_served_without_compute"] = served.get("served_without_compute", 0.0)
        out[f"{kind}_best_possible"] = best.get("best_hit_rate", 0.0)
    ceiling = results["offline"]["batched_texts_per_s"]
    a_u = aware["unique_embed_32"]
    n_u = naive["unique_embed_32"]
    out |= {
        "unique_embed_texts_per_s_aware": a_u["throughput_rps"],
        "unique_embed_texts_per_s_naive": n_u["throughput_rps"],
        "unique_embed_vs_noop": a_u["throughput_rps"] / results["noop"]["throughput_rps"],
        "embed_32_texts_vs_ceiling": aware["embed_32_texts"]["texts_per_s"] / ceiling,
        "embedder_useful_share_aware": a_u["replicas"]["embedder"]["items_per_s"] / ceiling,
        "embedder_useful_share_naive": n_u["replicas"]["embedder"]["items_per_s"] / ceiling,
        "mean_embed_batch_aware": a_u["replicas"]["embedder"]["mean_batch"],
        "mean_embed_batch_naive": n_u["replicas"]["embedder"]["mean_batch"],
        "lone_embed_p50_ms_adaptive": aware["lone_embed"]["p50_ms"],
        "lone_embed_p50_ms_fixed": aware["lone_embed_fixed_window"]["p50_ms"],
        "lone_encode_ms": results["offline"]["lone_encode_ms"],
    }
    if "onnx_lone_encode_ms" in results["offline"]:  # results from before the ONNX forward
        offline = results["offline"]
        out["lone_encode_ms_onnx"] = offline["onnx_lone_encode_ms"]
        out["embed_32_texts_vs_onnx_ceiling"] = (
            aware["embed_32_texts"]["texts_per_s"] / offline["onnx_batched_texts_per_s"]
        )
    out["embedder_useful_share_ratio"] = (
        out["embedder_useful_share_aware"] / out["embedder_useful_share_naive"]
    )
    if results.get("peer"):
        peer = results["peer"]
        out["unique_embed_vs_peer"] = (
            a_u["throughput_rps"] / peer["unique_embed_32"]["throughput_rps"]
        )
        out["lone_embed_p50_ms_peer"] = peer["lone_embed"]["p50_ms"]
    return out


def generations_per_1000(phase: dict[str, Any]) -> float | None:
    """LLM generations started per 1,000 requests served in `phase` (None: not recorded)."""
    generator = phase.get("replicas", {}).get("generator", {})
    if "requests" not in generator or not phase["ok"]:
        return None
    return 1000 * generator["requests"] / phase["ok"]


def peak_qps(graph: dict[str, Any]) -> float:
    """The most successful requests/s a graph served, closed loop or open, in a phase where
    it served the whole mix (`plots.served_all`)."""
    phases = plots.capacity_phases([graph["peak"], *graph["open_loop"]])
    return max(r["throughput_rps"] for r in phases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per measured phase")
    parser.add_argument("--spec", type=json.loads, default={}, help="WorkloadSpec fields, JSON")
    parser.add_argument("--no-peer", action="store_true", help="skip Infinity")
    transport = parser.add_mutually_exclusive_group()
    transport.add_argument(
        "--direct-ingress",
        action="store_true",
        help="both graphs (and the no-op) behind Ray Serve's direct ingress, not the proxy",
    )
    transport.add_argument(
        "--haproxy",
        action="store_true",
        help="direct ingress with Serve's HAProxy ingress in front, in the proxy's place",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "compare.json")
    parser.add_argument("--plots", type=Path, default=RESULTS, help="folder for the PNGs")
    args = parser.parse_args(argv)

    steps = 2 * (8 + len(LOAD_FACTORS)) + 1 + (0 if args.no_peer else 2)
    with tqdm(total=steps, unit="step", file=sys.stderr) as progress:
        bench = Bench(args.seconds, args.spec, progress, args.direct_ingress, args.haproxy)
        progress.set_description("offline ceiling (sentence-transformers, batch 64)")
        bench.results["offline"] = offline_ceiling(unique_texts(1024))
        progress.update(1)
        naive = bench.measure_graph("naive", None)
        bench.results["graphs"]["naive"] = naive
        bench.results["graphs"]["compute_aware"] = bench.measure_graph(
            "compute_aware", naive["rates"]
        )
        if not args.no_peer:
            bench.results["peer"] = bench.measure_peer()
    results = bench.results
    results["command"] = "python -m benchmarks.compare " + " ".join(argv or sys.argv[1:])
    results["transport"] = TRANSPORTS[(args.direct_ingress, args.haproxy)]
    results["ratios"] = ratios(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    written = plots.write_all(results, args.plots)
    for key, value in results["ratios"].items():
        print(f"{key:>34}: {value:.3f}")
    print("wrote", args.json, *written, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
