"""notebooks/benchmark.ipynb runs top to bottom on a small results file (so it never rots)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
SMALL_RESULTS = ROOT / "tests" / "data" / "compare_small.json"


def test_benchmark_notebook_executes_and_draws_every_plot(monkeypatch):
    notebook = nbformat.read(ROOT / "notebooks" / "benchmark.ipynb", as_version=4)
    monkeypatch.setenv("MNEME_BENCH_RESULTS", str(SMALL_RESULTS))
    NotebookClient(
        notebook,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # latency CDF, throughput vs load, hit rate over time, batch sizes
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("peak throughput" in t for t in tables)
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "compare_small.json" in printed
