"""The GPU check script runs here on CPU with tiny sizes, so the device run does not find a
broken script; on a CUDA machine `-m gpu` runs the torch search path there too."""

import numpy as np
import pytest
import torch

from benchmarks import gpu_check
from mneme.config import IndexConfig
from mneme.index import NamespaceIndex
from mneme.records import NewMemory


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--batches", "1", "8", "--seconds", "0.2"]
    argv += ["--vectors", "3000", "--queries", "100", "--replicas", "2", "--out", str(out)]
    assert gpu_check.main(argv) == 0
    result = __import__("json").loads(out.read_text())
    embedder = result["embedder"]["cpu"]
    assert embedder["fp32_batch_1"] > 0 and embedder["fp32_batch_8"] > 0
    assert embedder["shared_device"]["2_processes"] > 0
    search = result["search"]["cpu"]
    assert search["vectors"] == 3000 and search["recall_at_10_vs_fp32"] == 1.0
    assert search["batched_qps"] > 0 and search["single_qps"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_search_path_agrees_with_faiss():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20_000, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [NewMemory(f"m{i}", "t") for i in range(len(vectors))]
    cpu, gpu = NamespaceIndex("ns", 384), NamespaceIndex("ns", 384, IndexConfig(flat_device="cuda"))
    cpu.upsert(items, vectors)
    gpu.upsert(items, vectors)
    queries = vectors[:256]
    agree = [
        len({h.id for h in a} & {h.id for h in b}) / 10
        for a, b in zip(cpu.search(queries, 10), gpu.search(queries, 10), strict=True)
    ]
    assert np.mean(agree) >= 0.99  # fp16 on the GPU may swap near-ties
