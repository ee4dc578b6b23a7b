"""The cache-hit path through HTTP beside Serve's no-op floor, in one run.

    python -m benchmarks.cache_http [--requests 400]

Measures, interleaved request by request (so drift hits both alike): a no-op FastAPI ingress
(proxy -> one replica -> JSON), a cached `/v1/embeddings` call (proxy -> Router -> cache
actor -> JSON of 384 floats) and, for scale, an uncached one (the Embedder computes).
Reports p50/p95 and the ratio cached / no-op.
"""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import httpx

from benchmarks.serving import served_graph, summary_ms, timed

RESULTS = Path(__file__).resolve().parent / "results"


def run(requests: int) -> dict:
    with served_graph({}) as base_url, httpx.Client(base_url=base_url, timeout=60) as http:
        cached_text = "what did the user say about their travel plans last week?"
        body = {"input": cached_text}
        for _ in range(20):  # warm every path (and the cache entry)
            http.post("/noop/v1/embeddings", json=body).raise_for_status()
            http.post("/v1/embeddings", json=body).raise_for_status()
        noop, cached, uncached = [], [], []
        for i in range(requests):
            noop.append(timed(lambda: http.post("/noop/v1/embeddings", json=body)))
            r = None

            def hit():
                nonlocal r
                r = http.post("/v1/embeddings", json=body)

            cached.append(timed(hit))
            assert r is not None and r.headers["x-cache"] == "hit-l1", r.headers
            if i % 4 == 0:
                fresh = {"input": f"{cached_text} {uuid.uuid4().hex}"}
                uncached.append(timed(lambda b=fresh: http.post("/v1/embeddings", json=b)))
    result = {
        "noop": summary_ms(noop),
        "cached_embedding": summary_ms(cached),
        "uncached_embedding": summary_ms(uncached),
    }
    result["cached_over_noop_p50"] = result["cached_embedding"]["p50_ms"] / result["noop"]["p50_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--json", type=Path, default=RESULTS / "cache_http.json")
    args = parser.parse_args()
    result = run(args.requests)
    for name in ("noop", "cached_embedding", "uncached_embedding"):
        s = result[name]
        print(f"{name:>20}: p50 {s['p50_ms']:6.2f} ms  p95 {s['p95_ms']:6.2f} ms  (n={s['n']})")
    print(f"cached /v1/embeddings p50 / no-op Serve p50 = {result['cached_over_noop_p50']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
