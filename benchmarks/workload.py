"""A workload modelled on agents' traffic, sent from its own process to an HTTP ingress.

    python -m benchmarks.workload --url http://127.0.0.1:8000 --seed-corpus
    python -m benchmarks.workload --url http://127.0.0.1:8000 --mode open --rate 20 --seconds 30
    python -m benchmarks.workload --url http://127.0.0.1:8000 --mode closed --concurrency 32

Agents (namespaces, themselves Zipf-popular) each own a memory corpus. They ask questions
drawn with Zipf skew from one pool shared by all agents (so the same text recurs across
agents), and repeat their own recent questions within a session. Requests mix the endpoints
(embed, search, answer, add) and the priority classes. Arrivals are open-loop Poisson at a
target rate (latency counted from the scheduled send time, so a slow server cannot slow the
clock: no coordinated omission), or closed-loop with N clients to find peak throughput.
Every run is bounded in requests and seconds, and talks to loopback only.

`--kind unique-embed` sends single texts never seen before (`--texts-per-request` per call)
to `--path` (the no-op ingress and the Infinity peer speak the same OpenAI shape).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

WORDS = (
    "trip paris flight hotel budget meeting project deadline report client invoice dentist "
    "birthday gift sister brother mother father garden recipe pasta allergy peanut doctor "
    "running marathon knee injury physio coffee tea morning evening weekend holiday beach "
    "mountain ski snow rent landlord lease car repair insurance bank loan salary promotion "
    "manager team hiring interview python rust database migration outage pager oncall "
    "laptop phone password backup photo album wedding anniversary concert ticket movie book "
    "novel author podcast guitar lesson piano exam grade school teacher homework daughter son "
    "dog cat vet walk park bike commute train bus traffic weather rain umbrella jacket shoes"
).split()
QUESTION_FORMS = (
    "what did the user say about {a} and {b}?",
    "when is the {a} {b} planned?",
    "does the user prefer {a} or {b}?",
    "remind me what we decided on the {a} {b}",
    "who was involved in the {a} {b}?",
    "how does the user feel about {a} {b}?",
)
PRIORITIES = ("critical", "high", "normal", "low", "background")


@dataclass(frozen=True)
class WorkloadSpec:
    """The knobs of the generated traffic (all seeded: the same spec gives the same trace)."""

    seed: int = 0
    namespaces: int = 16
    corpus_size: int = 200  # memories per namespace, added by --seed-corpus
    query_pool: int = 400  # distinct questions shared by all agents
    query_skew: float = 1.2  # Zipf exponent over the pool
    namespace_skew: float = 0.8  # some agents are busier than others
    session_repeat: float = 0.3  # chance an agent repeats one of its last questions
    session_memory: int = 5
    mix: dict[str, float] = field(
        default_factory=lambda: {"embed": 0.2, "search": 0.5, "answer": 0.25, "add": 0.02}
    )
    priorities: dict[str, float] = field(
        default_factory=lambda: {
            "critical": 0.1,
            "high": 0.2,
            "normal": 0.4,
            "low": 0.2,
            "background": 0.1,
        }
    )
    top_k: int = 5
    answer_max_tokens: int = 16


@dataclass(frozen=True)
class Request:
    kind: str  # embed | search | answer | add | unique-embed
    path: str
    body: dict[str, Any]
    priority: str


def zipf_weights(n: int, skew: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** skew
    return weights / weights.sum()


def namespace_name(i: int) -> str:
    return f"agent-{i:03d}"


def questions(spec: WorkloadSpec) -> list[str]:
    rng = random.Random(spec.seed)
    out: list[str] = []
    while len(out) < spec.query_pool:
        q = rng.choice(QUESTION_FORMS).format(a=rng.choice(WORDS), b=rng.choice(WORDS))
        if q not in out:
            out.append(q)
    return out


def memory_text(rng: random.Random, tag: str) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(8))
    return f"the user mentioned {words} ({tag})"


def corpus_requests(spec: WorkloadSpec, chunk: int = 50) -> Iterator[Request]:
    """The memories every namespace starts with, in requests of `chunk` items."""
    rng = random.Random(spec.seed + 1)
    for ns in range(spec.namespaces):
        items = [
            {"id": f"seed-{i}", "text": memory_text(rng, f"{ns}.{i}"), "metadata": {"n": i}}
            for i in range(spec.corpus_size)
        ]
        for start in range(0, len(items), chunk):
            body = {"namespace": namespace_name(ns), "items": items[start : start + chunk]}
            yield Request("add", "/v1/memories", body, "background")


class Trace:
    """An endless, deterministic stream of requests for one `stream` (phase) of a run."""

    def __init__(self, spec: WorkloadSpec, stream: int = 0):
        self.spec = spec
        self._rng = random.Random(spec.seed * 1_000_003 + stream)
        self._np = np.random.default_rng([spec.seed, stream])
        self._stream = stream
        self._questions = questions(spec)
        self._q_weights = zipf_weights(spec.query_pool, spec.query_skew)
        self._ns_weights = zipf_weights(spec.namespaces, spec.namespace_skew)
        self._recent: dict[int, deque[str]] = {}
        self._kinds = list(spec.mix)
        self._kind_weights = np.asarray([spec.mix[k] for k in self._kinds], dtype=float)
        self._kind_weights /= self._kind_weights.sum()
        self._classes = list(spec.priorities)
        self._class_weights = np.asarray([spec.priorities[c] for c in self._classes], float)
        self._class_weights /= self._class_weights.sum()
        self._count = 0

    def _question(self, ns: int) -> str:
        recent = self._recent.setdefault(ns, deque(maxlen=self.spec.session_memory))
        if recent and self._rng.random() < self.spec.session_repeat:
            return self._rng.choice(list(recent))
        q = self._questions[int(self._np.choice(self.spec.query_pool, p=self._q_weights))]
        recent.append(q)
        return q

    @classmethod
    def replay(cls, spec: WorkloadSpec, streams: list[tuple[int, int]]) -> list[Request]:
        """The requests a run sent: for each (stream, count), in order, that stream's first
        `count` requests (what the best-possible hit rates are computed on)."""
        requests: list[Request] = []
        for stream, count in streams:
            trace = cls(spec, stream)
            requests += [next(trace) for _ in range(count)]
        return requests

    def __iter__(self) -> Iterator[Request]:
        return self

    def __next__(self) -> Request:
        self._count += 1
        kind = self._kinds[int(self._np.choice(len(self._kinds), p=self._kind_weights))]
        priority = self._classes[int(self._np.choice(len(self._classes), p=self._class_weights))]
        ns = int(self._np.choice(self.spec.namespaces, p=self._ns_weights))
        namespace = namespace_name(ns)
        if kind == "add":
            tag = f"s{self._stream}.{self._count}"
            item = {"id": f"new-{tag}", "text": memory_text(self._rng, tag)}
            return Request(
                kind, "/v1/memories", {"namespace": namespace, "items": [item]}, priority
            )
        query = self._question(ns)
        if kind == "embed":
            return Request(kind, "/v1/embeddings", {"input": query}, priority)
        body = {"namespace": namespace, "query": query, "top_k": self.spec.top_k}
        if kind == "search":
            return Request(kind, "/v1/memories/search", body, priority)
        body["max_tokens"] = self.spec.answer_max_tokens
        return Request(kind, "/v1/answer", body, priority)


class UniqueTexts:
    """Embedding requests of texts never seen before (nothing can come from a cache)."""

    def __init__(self, path: str, per_request: int, stream: int = 0, body: dict | None = None):
        self._path = path
        self._per = per_request
        self._rng = random.Random(stream)
        self._stream = stream
        self._body = body or {}
        self._count = 0

    def __iter__(self) -> Iterator[Request]:
        return self

    def __next__(self) -> Request:
        texts = []
        for _ in range(self._per):
            self._count += 1
            words = " ".join(self._rng.choice(WORDS) for _ in range(10))
            texts.append(f"{words} {self._stream}.{self._count}")
        inp = texts[0] if self._per == 1 else texts
        return Request("unique-embed", self._path, {**self._body, "input": inp}, "normal")


@dataclass
class Outcome:
    index: int  # position in the trace
    kind: str
    priority: str
    sent_s: float  # since the run started (scheduled time in open loop)
    latency_s: float
    status: int  # 0: the connection failed
    cache: str
    memories: list[str] | None = None  # an answer's memories (ids), for `hit_bound`


async def _send(
    session: aiohttp.ClientSession, base: str, req: Request
) -> tuple[int, str, list[str] | None]:
    """Status, X-Cache and, for an answer, the ids of the memories it was given."""
    headers = {"X-Priority": req.priority}
    try:
        async with session.post(base + req.path, json=req.body, headers=headers) as resp:
            body = await resp.read()
            memories = None
            if req.kind == "answer" and resp.status == 200:
                memories = [m["id"] for m in json.loads(body)["memories"]]
            return resp.status, resp.headers.get("x-cache", ""), memories
    except (TimeoutError, aiohttp.ClientError):
        return 0, "", None


async def run_closed(
    base: str, requests: Iterator[Request], concurrency: int, seconds: float, limit: int
) -> list[Outcome]:
    """`concurrency` clients, each sending its next request when the last one is answered."""
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    next_index = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < limit and time.perf_counter() - start < seconds:
            index, req = next_index, next(requests)
            next_index += 1
            sent = time.perf_counter()
            status, cache, memories = await _send(session, base, req)
            latency, at = time.perf_counter() - sent, sent - start
            outcomes.append(
                Outcome(index, req.kind, req.priority, at, latency, status, cache, memories)
            )

    async with _session(concurrency) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return sorted(outcomes, key=lambda o: o.index)


async def run_open(
    base: str, requests: Iterator[Request], rate: float, seconds: float, limit: int, seed: int
) -> list[Outcome]:
    """Poisson arrivals at `rate`/s for `seconds`; latency from each scheduled send time."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    tasks = []
    async with _session(1024) as session:
        start = time.perf_counter()

        async def one(index: int, at: float, req: Request) -> None:
            status, cache, memories = await _send(session, base, req)
            latency = time.perf_counter() - start - at
            outcomes.append(
                Outcome(index, req.kind, req.priority, at, latency, status, cache, memories)
            )

        at = 0.0
        for index in range(limit):
            at += rng.expovariate(rate)
            if at >= seconds:
                break
            req = next(requests)
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, at, req)))
        await asyncio.gather(*tasks)
    return sorted(outcomes, key=lambda o: o.index)


def _session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=120),
    )


def summarise(outcomes: list[Outcome], seconds: float) -> dict[str, Any]:
    """Throughput of successful requests, latency percentiles, statuses and cache tiers."""
    ok = [o for o in outcomes if 200 <= o.status < 300]
    wall = max((o.sent_s + o.latency_s for o in outcomes), default=0.0) or seconds
    lat = np.asarray([o.latency_s for o in ok]) * 1000.0

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q)) if len(lat) else None

    per_kind = {}
    for kind in sorted({o.kind for o in ok}):
        k = np.asarray([o.latency_s for o in ok if o.kind == kind]) * 1000.0
        per_kind[kind] = {"n": len(k), "p50_ms": float(np.median(k))}
    return {
        "sent": len(outcomes),
        "ok": len(ok),
        "wall_s": wall,
        "throughput_rps": len(ok) / wall if wall else 0.0,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "latency_ms_percentiles": [float(v) for v in np.percentile(lat, range(101))]
        if len(lat)
        else [],
        "statuses": dict(Counter(str(o.status) for o in outcomes)),
        "cache": dict(Counter(o.cache or "none" for o in ok)),
        "per_kind": per_kind,
    }


def answer_memories(stream: int, outcomes: list[dict]) -> dict[tuple[int, int], tuple[str, ...]]:
    """(stream, index) -> the memory ids each answered request was given, from a run's
    `outcomes` (its JSON): what `hit_bound` keys answers' generations by."""
    return {
        (stream, o["index"]): tuple(o["memories"])
        for o in outcomes
        if o.get("memories") is not None
    }


async def seed_corpus(base: str, spec: WorkloadSpec, concurrency: int = 4) -> int:
    """Adds every namespace's starting memories; fails loudly on any error."""
    reqs = list(corpus_requests(spec))
    outcomes = await run_closed(base, iter(reqs), concurrency, float("inf"), len(reqs))
    failed = [o for o in outcomes if o.status != 200]
    if failed:
        raise RuntimeError(f"{len(failed)} corpus adds failed, e.g. status {failed[0].status}")
    return sum(len(r.body["items"]) for r in reqs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="ingress base URL (loopback)")
    parser.add_argument("--mode", choices=["open", "closed"], default="closed")
    parser.add_argument("--kind", choices=["agents", "unique-embed"], default="agents")
    parser.add_argument("--rate", type=float, default=10.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: clients")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--stream", type=int, default=0, help="which part of the trace")
    parser.add_argument("--spec", type=json.loads, default={}, help="WorkloadSpec fields, JSON")
    parser.add_argument("--path", default="/v1/embeddings", help="unique-embed: the route")
    parser.add_argument("--model", default=None, help="unique-embed: the model field")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--seed-corpus", action="store_true", help="add the corpora first")
    parser.add_argument("--out", type=Path, help="JSON: summary and every request's outcome")
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
        parser.error("--url must be a loopback address")
    spec = WorkloadSpec(**args.spec)

    async def go() -> dict[str, Any]:
        seeded = await seed_corpus(args.url, spec) if args.seed_corpus else 0
        if args.kind == "agents":
            requests: Iterator[Request] = Trace(spec, args.stream)
        else:
            body = {"model": args.model} if args.model else {}
            requests = UniqueTexts(args.path, args.texts_per_request, args.stream, body)
        if args.mode == "closed":
            outcomes = await run_closed(
                args.url, requests, args.concurrency, args.seconds, args.max_requests
            )
        else:
            outcomes = await run_open(
                args.url, requests, args.rate, args.seconds, args.max_requests, args.stream
            )
        return {
            "args": {k: v for k, v in vars(args).items() if k != "out"} | {"out": None},
            "spec": asdict(spec),
            "seeded_memories": seeded,
            "summary": summarise(outcomes, args.seconds),
            "outcomes": [asdict(o) for o in outcomes],
        }

    result = asyncio.run(go())
    s = result["summary"]
    print(
        f"{s['ok']}/{s['sent']} ok, {s['throughput_rps']:.1f} req/s, "
        f"p50 {s['p50_ms'] or 0:.1f} ms, p95 {s['p95_ms'] or 0:.1f} ms, statuses {s['statuses']}",
        file=sys.stderr,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
