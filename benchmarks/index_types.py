"""Flat vs HNSW vs IVF through Mneme's own NamespaceIndex, and snapshot/replay for recovery.

    python -m benchmarks.index_types [--sizes 100000 1000000] [--queries 1000]

Vectors: dim 384, unit length, drawn around 5,000 random centres (embeddings cluster; uniform
random vectors would understate what a graph or an inverted index can do), queries from the
same mixture. For each size and kind: build time and add rate (in batches of 10,000, as a
bulk import sends them, the rebuild into HNSW/IVF included), serialised size, single-query
and batched (all queries in one call) QPS, and recall@10 against exact search, at a few
search-time settings. Then, on the flat store: snapshot write and load time, and the replay
rate of logged writes (what a restarting replica does). Writes benchmarks/results/index_types.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from mneme.config import IndexConfig
from mneme.durable import DurableStore, read_snapshot, write_snapshot
from mneme.index import MemoryStore, NamespaceIndex
from mneme.records import NewMemory

RESULTS = Path(__file__).resolve().parent / "results"
DIM = 384
CENTRES = 5000
NOISE = 1.2  # noise norm relative to the centre's: neighbours are close but not trivial
SETTINGS = {"flat": [{}], "hnsw": [{"hnsw_ef_search": e} for e in (32, 64, 128)],
            "ivf": [{"ivf_nprobe": p} for p in (16, 64, 128, 256)]}  # fmt: skip


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        picks = centres[rng.integers(0, len(centres), m)]
        block = picks + NOISE * rng.standard_normal((m, DIM)).astype(np.float32) / np.sqrt(DIM)
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def build(kind: str, vectors: np.ndarray) -> tuple[NamespaceIndex, float]:
    config = IndexConfig(kind=kind, min_size=len(vectors))  # converts once, when all are in
    index = NamespaceIndex("bench", DIM, config)
    start = time.perf_counter()
    for lo in range(0, len(vectors), 10_000):
        hi = min(lo + 10_000, len(vectors))
        index.upsert([NewMemory(f"m{i}", f"t{i}") for i in range(lo, hi)], vectors[lo:hi])
    index.settle()  # the rebuild as `kind` runs in a thread
    return index, time.perf_counter() - start


def recall_at_10(found: list, truth: np.ndarray) -> float:
    hits = sum(len({h.id for h in row} & {f"m{j}" for j in exact}) for row, exact in
               zip(found, truth, strict=True))  # fmt: skip
    return hits / (10 * len(truth))


def measure(size: int, n_queries: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    vectors = clustered(rng, size, centres)
    queries = clustered(rng, n_queries, centres)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    _, truth = exact.search(queries, 10)
    del exact
    out: dict = {"size": size, "queries": n_queries, "kinds": {}}
    for kind, settings in SETTINGS.items():
        print(f"  {size:>9,} {kind}: building ...", flush=True)
        index, build_s = build(kind, vectors)
        mb = len(faiss.serialize_index(index._index)) / 1e6
        row = {"build_s": build_s, "adds_per_s": size / build_s, "serialised_mb": mb,
               "settings": []}  # fmt: skip
        for setting in settings:
            index.config = IndexConfig(kind=kind, min_size=size, **setting)
            start = time.perf_counter()
            found = index.search(queries, 10)
            batched = n_queries / (time.perf_counter() - start)
            singles = min(n_queries, 200)
            start = time.perf_counter()
            for q in queries[:singles]:
                index.search(q[None, :], 10)
            single = singles / (time.perf_counter() - start)
            result = {**setting, "recall_at_10": recall_at_10(found, truth),
                      "batched_qps": batched, "single_qps": single}  # fmt: skip
            row["settings"].append(result)
            print(f"      {setting or 'exact'}: recall@10 {result['recall_at_10']:.3f}, "
                  f"{single:,.0f} single q/s, {batched:,.0f} batched q/s", flush=True)  # fmt: skip
        out["kinds"][kind] = row
        if kind == "flat":
            out["recovery"] = recovery(index, vectors)
        del index
    return out


def recovery(index: NamespaceIndex, vectors: np.ndarray) -> dict:
    """Snapshot write/load of the whole store, and replaying logged writes after it."""
    store = MemoryStore(DIM)
    store._namespaces["bench"] = index
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.pkl"
        start = time.perf_counter()
        write_snapshot(store.state(), {}, path)
        write_s = time.perf_counter() - start
        start = time.perf_counter()
        read_snapshot(path)
        load_s = time.perf_counter() - start
        snapshot_mb = path.stat().st_size / 1e6
        durable = DurableStore(Path(tmp) / "log", "NORMAL", snapshot_every=10**9)
        for lo in range(0, 10_000, 100):
            items = [NewMemory(f"r{i}", f"replayed {i}") for i in range(lo, lo + 100)]
            durable.upsert("replay", items, vectors[lo : lo + 100])
        start = time.perf_counter()
        again = DurableStore(Path(tmp) / "log", "NORMAL", snapshot_every=10**9)
        replay_s = time.perf_counter() - start
        assert again.stats()["memories"] == 10_000
    return {"snapshot_write_s": write_s, "snapshot_load_s": load_s,
            "snapshot_mb": snapshot_mb, "replayed_memories_per_s": 10_000 / replay_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=RESULTS / "index_types.json")
    args = parser.parse_args()
    results = {"command": "python -m benchmarks.index_types " + " ".join(sys.argv[1:]),
               "faiss_threads": faiss.omp_get_max_threads(), "runs": []}  # fmt: skip
    for size in args.sizes:
        results["runs"].append(measure(size, args.queries))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))  # after each size
    print("wrote", args.json)


if __name__ == "__main__":
    main()
