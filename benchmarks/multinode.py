"""Mneme on a real two-node Ray cluster: autoscaling under a load ramp, a worker node killed
under load, scale-down when load stops, and no acknowledged memory lost.

    python -m benchmarks.multinode            # ~4 min; writes results/multinode.{json,png}

A head and a worker (`ray start` processes, loopback, token auth), Redis for the memory log
and the L2 cache, and `serve deploy` of configs/cluster.yaml with only what one machine
forces changed (see `cluster_config`). Then, with clients ramped 4 -> 16 over 15 s that
retry what is idempotent (adds carry ids, so a retried add stores one copy):
1. load until every deployment that scales has replicas RUNNING on both nodes;
2. SIGKILL the worker node under load; load goes on until every deployment is HEALTHY again;
3. load stops; wait until every deployment is back at min_replicas;
4. every acknowledged memory is read back, and unauthorised calls are refused.
The replica count per deployment and node is sampled every 0.5 s throughout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from benchmarks.ray_cluster import LocalRayCluster
from benchmarks.serving import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
APP = "mneme"
DEPLOYMENTS = ("Router", "Embedder", "VectorSearch", "Generator")
ADMIN_KEY, AGENT_KEY = "multinode-admin-" + uuid.uuid4().hex, "multinode-agent-" + uuid.uuid4().hex
RETRYABLE = {502, 503, 504}


def lost_with_its_replica(r: httpx.Response) -> bool:
    """Ray Serve's proxy answers a plain-text 500 when the ingress (Router) replica holding
    the request dies, e.g. with its node; Mneme's own errors are always JSON. Whether the
    request was applied is unknown, so only an idempotent call may be retried on it."""
    return r.status_code == 500 and "json" not in r.headers.get("content-type", "")


CHAT = "/v1/chat/completions"


def cluster_config(http_port: int, redis_url: str, data_dir: Path) -> dict:
    """configs/cluster.yaml, changed only where one machine and a test's patience force it."""
    raw = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    raw["proxy_location"] = "HeadOnly"  # every node's proxy would bind the same port here
    raw["http_options"] = {"host": "127.0.0.1", "port": http_port, "request_timeout_s": 120}
    app = raw["applications"][0]
    app["runtime_env"]["working_dir"] = f"local://{ROOT}"
    args = app["args"]
    args["vector_search"]["storage"].update(
        redis_url=redis_url.replace("/0", "/1"), data_dir=str(data_dir)
    )
    args["cache"]["redis_url"] = redis_url
    args["generator"]["model_path"] = str(ROOT / ".models" / "tiny-llama")
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.5  # 2 real cores behind 6 logical
        deployment["autoscaling_config"].update(
            upscale_delay_s=2, downscale_delay_s=8, look_back_period_s=2, metrics_interval_s=0.5
        )
    scaling = {d["name"]: d["autoscaling_config"] for d in app["deployments"]}
    scaling["Router"].update(max_replicas=3, target_ongoing_requests=4)
    scaling["Embedder"].update(max_replicas=4)
    scaling["VectorSearch"].update(max_replicas=2, target_ongoing_requests=2)
    scaling["Generator"].update(max_replicas=1)  # one vLLM per machine (memory)
    return raw


@dataclass
class Load:
    """Client threads: embeddings, adds (with ids) and searches, retrying what failed."""

    base_url: str
    acked: dict[str, str] = field(default_factory=dict)  # memory id -> namespace
    done: Counter = field(default_factory=Counter)
    attempt_errors: Counter = field(default_factory=Counter)  # before a retry succeeded
    failed: list[str] = field(default_factory=list)  # still failing after every retry
    failed_generation: list[str] = field(default_factory=list)  # the same, for chat
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    ids: itertools.count = field(default_factory=itertools.count)

    def start(self, clients: int) -> None:
        """`clients` more client threads."""
        for _ in range(clients):
            thread = threading.Thread(target=self._client, args=(len(self.threads),), daemon=True)
            thread.start()
            self.threads.append(thread)

    def ramp(self, clients: int, step: int, every_s: float) -> None:
        """`step` clients now and `step` more every `every_s` up to `clients` (a thread)."""

        def grow() -> None:
            while len(self.threads) < clients and not self.stop.is_set():
                self.start(min(step, clients - len(self.threads)))
                self.stop.wait(every_s)

        threading.Thread(target=grow, daemon=True).start()

    def finish(self) -> None:
        self.stop.set()
        for thread in list(self.threads):
            thread.join(timeout=180)

    def _call(self, http: httpx.Client, path: str, body: dict) -> bool:
        failed = self.failed_generation if path == CHAT else self.failed
        for attempt in range(8):
            try:
                r = http.post(path, json=body)
                if r.status_code == 200:
                    with self.lock:
                        self.done[path] += 1
                    return True
                if lost_with_its_replica(r):
                    error, wait = "500 (Router replica lost)", 1.0
                elif r.status_code in RETRYABLE:
                    error, wait = str(r.status_code), float(r.headers.get("retry-after", 1))
                else:
                    with self.lock:
                        failed.append(f"{path} {r.status_code} {r.text[:200]}")
                    return False
            except httpx.HTTPError as exc:
                error, wait = type(exc).__name__, 1.0
            with self.lock:
                self.attempt_errors[error] += 1
            time.sleep(min(wait, 0.5 * 2**attempt))
        with self.lock:
            failed.append(f"{path}: gave up after 8 attempts")
        return False

    def _client(self, worker: int) -> None:
        headers = {"Authorization": f"Bearer {AGENT_KEY}"}
        namespace = f"agent-{worker % 4}"
        with httpx.Client(base_url=self.base_url, headers=headers, timeout=60) as http:
            while not self.stop.is_set():
                n = next(self.ids)
                text = f"client {worker} remembers fact {n} ({uuid.uuid4().hex[:8]})"
                if n % 4 == 0:
                    memory_id = f"mem-{n}"
                    item = {"id": memory_id, "text": text, "metadata": {"n": n}}
                    body = {"namespace": namespace, "items": [item]}
                    if self._call(http, "/v1/memories", body):
                        self.acked[memory_id] = namespace
                elif n % 4 == 1:
                    self._call(http, "/v1/memories/search", {"namespace": namespace, "query": text})
                elif n % 8 == 2:  # generation: 1 request in 8
                    message = {"role": "user", "content": text}
                    self._call(http, CHAT, {"messages": [message], "max_tokens": 8})
                else:
                    self._call(http, "/v1/embeddings", {"input": text})


class Monitor:
    """Samples replicas per deployment and node (and deployment status) every 0.5 s."""

    def __init__(self, cluster: LocalRayCluster, head_node: str):
        self.cluster, self.head_node = cluster, head_node
        self.samples: list[dict] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)

    def sample(self) -> dict:
        app = self.cluster.applications()["applications"][APP]
        row = {"t": round(self.now(), 2), "app": app["status"], "deployments": {}}
        for name in DEPLOYMENTS:
            d = app["deployments"][name]
            running = [r for r in d["replicas"] if r["state"] == "RUNNING"]
            row["deployments"][name] = {
                "status": d["status"],
                "target": d["target_num_replicas"],
                "head": sum(r.get("node_id") == self.head_node for r in running),
                "worker": sum(r.get("node_id") not in (None, self.head_node) for r in running),
            }
        return row

    def latest(self) -> dict:
        return self.samples[-1] if self.samples else {"deployments": {}}


def run(work_dir: Path, clients: int = 16, progress=print) -> dict:
    from tests.redis_server import RedisServer

    result: dict = {"clients": clients}
    env = {"MNEME_ADMIN_KEY": ADMIN_KEY, "MNEME_AGENT_KEY": AGENT_KEY}
    redis_server = RedisServer(appendfsync="always").start()
    cluster = load = monitor = None
    try:
        cluster = LocalRayCluster(work_dir / "ray", env=env)
        t = time.monotonic()
        cluster.start_head(num_cpus=6)  # logical: every replica fits here after the kill
        cluster.start_worker("worker", num_cpus=3)
        result["cluster_start_s"] = round(time.monotonic() - t, 1)
        head_node = next(node for node, is_head in cluster.alive_nodes().items() if is_head)
        progress(f"cluster up in {result['cluster_start_s']} s (head + worker)")

        http_port = free_port()
        config_path = work_dir / "cluster.run.yaml"
        config = cluster_config(http_port, redis_server.url, work_dir / "memories")
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        t = time.monotonic()
        cluster.serve_deploy(config_path)
        base_url = f"http://127.0.0.1:{http_port}"
        cluster.wait(
            lambda: cluster.applications()["applications"][APP]["status"] == "RUNNING",
            600,
            "the application",
        )
        result["deploy_s"] = round(time.monotonic() - t, 1)
        progress(f"serve deploy -> RUNNING in {result['deploy_s']} s")

        monitor = Monitor(cluster, head_node).start()
        load = Load(base_url)
        load_started = monitor.now()
        load.ramp(clients, step=4, every_s=5.0)  # 4, 8, 12, 16 clients over 15 s

        def scaled_across_nodes() -> bool:
            """20 s of load, every deployment asked to grow since the load started has run
            2+ replicas, and some deployment runs on both nodes. (Asked at any time, not only
            in the latest sample: the autoscaler's target can dip back to 1 while a new
            replica is still starting, which ended the wait before it ran.)"""
            since = [row for row in monitor.samples if row["t"] >= load_started]
            asked = {name for row in since for name, d in row["deployments"].items()
                     if d["target"] > 1}  # fmt: skip
            grown = {name for row in since for name, d in row["deployments"].items()
                     if d["head"] + d["worker"] > 1}  # fmt: skip
            rows = monitor.latest()["deployments"]
            return (
                monitor.now() - load_started > 20
                and bool(asked)
                and asked <= grown
                and any(r["head"] and r["worker"] for r in rows.values())
            )

        cluster.wait(scaled_across_nodes, 180, "replicas scaled up on both nodes", monitor.latest)
        progress(f"scaled up: {first_times(monitor.samples, load_started)}")

        before_kill = dict(load.done), dict(load.attempt_errors), len(load.failed)
        on_worker = {n: r["worker"] for n, r in monitor.latest()["deployments"].items()}
        killed_at = monitor.now()
        cluster.kill("worker")
        progress(f"worker node killed ({on_worker} replicas on it)")

        def healthy_again() -> bool:
            """Ray saw the node die, and every deployment runs its target on the head."""
            row = monitor.latest()
            return (
                len(cluster.alive_nodes()) == 1
                and row["app"] == "RUNNING"
                and all(
                    d["status"] == "HEALTHY" and d["worker"] == 0 and d["head"] == d["target"]
                    for d in row["deployments"].values()
                )
            )

        recovery_s = cluster.wait(
            healthy_again, 240, "every deployment HEALTHY after the kill", monitor.latest
        )
        time.sleep(15)  # load on the recovered graph
        result["worker_kill"] = {
            "replicas_on_worker": on_worker,
            "recovered_s": round(recovery_s, 1),
            "requests_during_and_after": sum(load.done.values()) - sum(before_kill[0].values()),
            "attempt_errors": dict(load.attempt_errors - Counter(before_kill[1])),
            "failed_after_retries": len(load.failed) - before_kill[2],
            "generation_failed_after_retries": len(load.failed_generation),
            "generation_after_recovery": check_generation(base_url),
        }
        progress(f"recovered: {result['worker_kill']}")

        load.finish()
        load_stopped = monitor.now()

        minimum = {d["name"]: d["autoscaling_config"]["min_replicas"] for d in config_apps(config)}

        def back_to_min() -> bool:
            rows = monitor.latest()["deployments"]
            return all(r["head"] + r["worker"] == minimum[n] and r["target"] == minimum[n]
                       for n, r in rows.items())  # fmt: skip

        result["scale_down_s"] = round(
            cluster.wait(back_to_min, 240, "scale down to min", monitor.latest), 1
        )
        progress(f"back to min_replicas {result['scale_down_s']} s after load stopped")
        monitor.stop()
        result["scale_up"] = first_times(monitor.samples, load_started)  # peaks: whole run
        result["requests"] = dict(load.done)
        result["failed"] = load.failed[:20]
        result["failed_count"] = len(load.failed)
        result["failed_generation"] = load.failed_generation[:20]
        result["memories"] = check_memories(base_url, load.acked)
        result["auth"] = check_auth(base_url)
        result["timeline"] = monitor.samples
        result["events"] = {"load_started": load_started, "worker_killed": killed_at,
                            "load_stopped": load_stopped}  # fmt: skip
        progress(f"memories: {result['memories']}, auth: {result['auth']}")
        return result
    finally:  # never leave client threads behind (a later test's app may reuse the port)
        try:
            if load is not None:
                load.finish()
            if monitor is not None:
                monitor.stop()
            if cluster is not None:
                cluster.shutdown()
        finally:
            redis_server.cleanup()


def config_apps(config: dict) -> list[dict]:
    return config["applications"][0]["deployments"]


def first_times(samples: list[dict], load_started: float) -> dict:
    """Per deployment: seconds from load start to a larger target, and to 2+ replicas running."""
    out = {}
    for name in DEPLOYMENTS:
        decided = running = None
        for row in samples:
            if row["t"] < load_started:
                continue
            d = row["deployments"][name]
            if decided is None and d["target"] > 1:
                decided = round(row["t"] - load_started, 1)
            if running is None and d["head"] + d["worker"] > 1:
                running = round(row["t"] - load_started, 1)
        peak = max((r["deployments"][name]["head"] + r["deployments"][name]["worker"])
                   for r in samples)  # fmt: skip
        out[name] = {"target_up_s": decided, "running_up_s": running, "peak_replicas": peak}
    return out


def check_memories(base_url: str, acked: dict[str, str]) -> dict:
    """Every acknowledged add, read back by id (admin key)."""
    lost = []
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
    ) as http:
        for memory_id, namespace in acked.items():
            r = http.get(f"/v1/memories/{memory_id}", params={"namespace": namespace})
            if r.status_code != 200:
                lost.append(memory_id)
    return {"acknowledged": len(acked), "lost": len(lost), "lost_ids": lost[:20]}


def check_generation(base_url: str) -> int:
    """One chat once the graph has recovered: generation works again (status code)."""
    body = {"messages": [{"role": "user", "content": "are you back?"}], "max_tokens": 8}
    headers = {"Authorization": f"Bearer {AGENT_KEY}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=120) as http:
        return http.post(CHAT, json=body).status_code


def check_auth(base_url: str) -> dict:
    with httpx.Client(base_url=base_url, timeout=30) as http:
        no_key = http.post("/v1/embeddings", json={"input": "x"}).status_code
        other_namespace = http.post(
            "/v1/memories/search",
            json={"namespace": "private", "query": "x"},
            headers={"Authorization": f"Bearer {AGENT_KEY}"},
        ).status_code
    return {"no_key": no_key, "agent_outside_its_namespaces": other_namespace}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(DEPLOYMENTS), 1, figsize=(8, 8), sharex=True)
    times = [row["t"] for row in result["timeline"]]
    for ax, name in zip(axes, DEPLOYMENTS, strict=True):
        rows = [row["deployments"][name] for row in result["timeline"]]
        ax.stackplot(times, [r["head"] for r in rows], [r["worker"] for r in rows],
                     labels=["running on head", "running on worker"], alpha=0.8)  # fmt: skip
        ax.step(times, [r["target"] for r in rows], where="post", color="black", label="target")
        ax.set_ylabel(name)
        for event, style in (("load_started", "g--"), ("worker_killed", "r--"),
                             ("load_stopped", "b--")):  # fmt: skip
            ax.axvline(result["events"][event], color=style[0], linestyle="--")
    axes[0].legend(loc="upper right", fontsize=7)
    axes[0].set_title("replicas under a load ramp, a worker SIGKILL (red) and load stop (blue)")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "multinode.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mneme-multinode-") as work:
        result = run(Path(work), clients=args.clients)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
