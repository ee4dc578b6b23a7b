"""The best hit rate any cache could reach on a trace that was actually sent.

Replays the requests in the order sent through the same lookup structure as the Router
(`deployments/serving.py`, `deployments/compute.py`): an answer looks up its answer key, on a
miss its search key (on a miss the query's embedding), then its generation, keyed by the
memories the answer was given (their ids, as the run's responses returned them: the
generation's prompt is built from them); a search looks up its search key, then the
embedding; an embed request its embedding; an add its items' embeddings, then bumps the
namespace's version (so search and answer keys of that namespace start over; generations
are keyed by their prompt and do not). Each kind's lookup sequence then goes through
Belady's clairvoyant policy at the cache's capacity, which is the compulsory-miss bound
when the capacity exceeds the distinct keys.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

from benchmarks.workload import Request, Trace, WorkloadSpec
from cache.belady import belady_hit_rate
from cache.keys import normalise_text

CACHE_KINDS = ("embedding", "search", "answer", "generation")  # the kinds looked up here
Memories = tuple[str, ...] | None  # the ids an answer was given; None: unknown or not an answer


def lookups(
    requests: Iterable[Request], memories: Sequence[Memories] | None = None
) -> dict[str, list[tuple]]:
    """Per kind, the keys a perfect cache would be asked for, in order. `memories`, aligned
    with `requests`, adds each answer's generation lookup where its memories are known."""
    seen: set[tuple] = set()
    version: dict[str, int] = defaultdict(int)
    out: dict[str, list[tuple]] = defaultdict(list)

    def ask(kind: str, key: tuple) -> bool:
        out[kind].append(key)
        if key in seen:
            return True
        seen.add(key)
        return False

    def embedding(text: str) -> None:
        ask("embedding", ("e", normalise_text(text)))

    def search(ns: str, query: str, top_k: int) -> None:
        if not ask("search", ("s", ns, version[ns], normalise_text(query), top_k)):
            embedding(query)

    requests = list(requests)
    memories = [None] * len(requests) if memories is None else memories
    for req, given in zip(requests, memories, strict=True):
        body = req.body
        if req.kind in ("embed", "unique-embed"):
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            for text in texts:
                embedding(text)
        elif req.kind == "search":
            search(body["namespace"], body["query"], body["top_k"])
        elif req.kind == "answer":
            ns, q = body["namespace"], body["query"]
            key = ("a", ns, version[ns], normalise_text(q), body["top_k"], body["max_tokens"])
            if not ask("answer", key):
                search(ns, q, body["top_k"])
                if given is not None:
                    ask("generation", ("g", ns, normalise_text(q), body["max_tokens"], given))
        elif req.kind == "add":
            for item in body["items"]:
                embedding(item["text"])
            version[body["namespace"]] += 1
    return out


def best_hit_rates(
    requests: Iterable[Request],
    capacity: int,
    warm_up: Iterable[Request] = (),
    memories: Sequence[Memories] | None = None,
) -> dict[str, dict]:
    """{kind: {"lookups": n, "best_hit_rate": h}} for every kind looked up in `requests`,
    after `warm_up` went through the cache first (not counted). `memories`: aligned with
    `warm_up` followed by `requests` (see `lookups`)."""
    warm_up, requests = list(warm_up), list(requests)
    warm = lookups(warm_up, None if memories is None else memories[: len(warm_up)])
    result = {}
    for kind, keys in lookups(warm_up + requests, memories).items():
        skip = len(warm.get(kind, []))
        ids: dict[tuple, int] = {}
        trace = [ids.setdefault(k, len(ids)) for k in keys]
        measured = len(trace) - skip
        if measured <= 0:
            continue
        if len(ids) <= capacity:  # all fits: only first uses miss
            first_seen = set(trace[:skip])
            hits = 0
            for key in trace[skip:]:
                hits += key in first_seen
                first_seen.add(key)
            best = hits / measured
        else:  # more keys than room: Belady's rate over the whole trace, warm-up included
            best = belady_hit_rate(trace, capacity)
        result[kind] = {"lookups": measured, "distinct": len(ids), "best_hit_rate": best}
    return result


def best_hit_rates_of_run(
    spec: WorkloadSpec,
    sent: list[tuple[int, int]],
    capacity: int,
    warm_up: list[tuple[int, int]] = (),
    memories: dict[tuple[int, int], tuple[str, ...]] | None = None,
) -> dict[str, dict]:
    """`best_hit_rates` of what a run sent: (trace stream, requests sent) pairs, in order,
    replayed from `spec` (`Trace.replay`), after the warm-up streams (not counted).
    `memories`: (stream, index in it) -> an answer's memory ids (`workload.answer_memories`)."""
    warm_up = list(warm_up)
    aligned = None
    if memories is not None:
        positions = [(stream, i) for stream, count in warm_up + sent for i in range(count)]
        aligned = [memories.get(position) for position in positions]
    return best_hit_rates(
        Trace.replay(spec, sent),
        capacity,
        warm_up=Trace.replay(spec, warm_up),
        memories=aligned,
    )
