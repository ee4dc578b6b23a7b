"""A peer embedding server, Infinity (`infinity-emb`), on the same MiniLM folder, for comparison.

    python -m benchmarks.peer [--lone 30] [--concurrency 32] [--seconds 10]

Infinity's pins clash with ours, so it lives in its own virtual environment, `.venv-infinity` at
the repo root (built on first use, or by `make peer`): a CPU torch pinned first, then
`infinity-emb[server,torch]`. The server loads the local model folder offline and never calls a
hub or sends telemetry.

`infinity_server()` yields a base URL ending in `/v1`: POST f"{base}/embeddings" (i.e.
`/v1/embeddings`, OpenAI-compatible) with {"model": SERVED_MODEL, "input": [...]}. The main
checks the vectors against ours (cosine), then measures lone-request p50 and the texts/s of
concurrent single-text requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.serving import free_port, summary_ms

ROOT = Path(__file__).resolve().parents[1]
VENV_NAME = ".venv-infinity"
TORCH_VERSION = "2.13.0"  # the CPU wheel on this machine's disk; unpinned may fetch a CUDA build
INFINITY_VERSION = "0.0.78"
INSTALL_STEPS: tuple[tuple[str, ...], ...] = (
    ("install", f"torch=={TORCH_VERSION}"),
    ("install", f"torch=={TORCH_VERSION}", f"infinity-emb[server,torch]=={INFINITY_VERSION}"),
    # PyPI's torchvision & co. break beside the CPU torch ("torchvision::nms does not exist")
    ("uninstall", "-y", "torchvision", "torchaudio", "torchcodec"),
)
# The name Infinity serves the model under (the `model` field of requests), the same as ours.
SERVED_MODEL = "all-MiniLM-L6-v2"
URL_PREFIX = "/v1"
START_TIMEOUT_S = 180.0


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _venv_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # `import infinity_emb` makes `.infinity_cache` in the working directory unless this is set
    env["INFINITY_HOME"] = str(venv)
    return env


def ensure_infinity_venv(root: Path = ROOT) -> Path:
    """Build `root/.venv-infinity` unless its `.installed` marker is there; return the path of
    its `infinity_emb` executable. Raises RuntimeError with pip's output tail on failure."""
    venv = Path(root).resolve() / VENV_NAME
    exe = venv / "bin" / "infinity_emb"
    marker = venv / ".installed"
    if marker.exists() and exe.exists():
        return exe
    started = time.perf_counter()
    print(f"[peer] creating {venv} (torch=={TORCH_VERSION}, infinity-emb=={INFINITY_VERSION})")
    if venv.exists():  # a half-built one from an interrupted run
        shutil.rmtree(venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = _venv_env(venv)
    for step in INSTALL_STEPS:
        print(f"[peer] pip {' '.join(step)}", flush=True)
        proc = subprocess.run(
            [str(python), "-m", "pip", *step],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"building {venv} failed at `pip {' '.join(step)}` (rc {proc.returncode}):\n"
                f"{_tail(proc.stdout)}"
            )
    check = subprocess.run(
        [
            str(python),
            "-c",
            "import infinity_emb, torch, sentence_transformers; print(torch.__version__)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if check.returncode != 0 or not exe.exists():
        raise RuntimeError(
            f"{venv} was built but does not import infinity_emb:\n{_tail(check.stdout)}"
        )
    marker.write_text(f"torch=={TORCH_VERSION}\ninfinity-emb=={INFINITY_VERSION}\n")
    print(f"[peer] {venv.name} ready in {time.perf_counter() - started:.0f} s")
    return exe


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; sweep whatever else of its group is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


@contextlib.contextmanager
def infinity_server(
    model_path: str, port: int | None = None, batch_size: int = 32
) -> Iterator[str]:
    """Infinity (`infinity_emb v2`, torch engine on CPU) serving `model_path` on 127.0.0.1.

    Yields the base URL `http://127.0.0.1:PORT/v1`: POST f"{base}/embeddings" with
    {"model": SERVED_MODEL, "input": [...]} (`SERVED_MODEL` = "all-MiniLM-L6-v2") answers in
    OpenAI's format, L2-normalised vectors; GET f"{base}/models" lists it. Ready only once it
    has answered a real embedding request. The server runs in its own process group, killed
    (SIGTERM, then SIGKILL) on exit. Offline: HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE; no telemetry
    (DO_NOT_TRACK, INFINITY_ANONYMOUS_USAGE_STATS=0); its cache dir goes inside the venv.
    """
    exe = ensure_infinity_venv(ROOT)
    venv = exe.parents[1]
    port = port or free_port()
    base = f"http://127.0.0.1:{port}{URL_PREFIX}"
    env = _venv_env(venv)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        DO_NOT_TRACK="1",
        INFINITY_ANONYMOUS_USAGE_STATS="0",
    )
    cmd = [
        str(exe), "v2",
        "--model-id", model_path,
        "--served-model-name", SERVED_MODEL,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--url-prefix", URL_PREFIX,
        "--engine", "torch",
        "--device", "cpu",
        "--batch-size", str(batch_size),
        "--no-compile",  # torch.compile on CPU: minutes of startup, needs a C compiler
        "--no-bettertransformer",  # needs optimum, not installed
        "--no-vector-disk-cache",  # a result cache would flatter its numbers
        "--log-level", "warning",  # no access log per request
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mneme-infinity-") as tmp:
        log_path = Path(tmp) / "infinity.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_ready(proc, base, log_path)
            yield base
        finally:
            _kill_group(proc)


def _wait_ready(proc: subprocess.Popen, base: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    body = {"model": SERVED_MODEL, "input": ["are you ready?"]}
    with httpx.Client(timeout=10) as http:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"infinity_emb exited with rc {proc.returncode} before serving:\n"
                    f"{_tail(log_path.read_text(errors='replace'))}"
                )
            with contextlib.suppress(httpx.TransportError):
                r = http.post(f"{base}/embeddings", json=body)
                if r.status_code == 200 and r.json()["data"]:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"infinity_emb did not serve within {START_TIMEOUT_S:.0f} s:\n"
                    f"{_tail(log_path.read_text(errors='replace'))}"
                )
            time.sleep(0.5)


def _text(i: int) -> str:
    """Unique, about 16 tokens with [CLS]/[SEP]."""
    return f"note {i}: what did the user say about their travel plans last week?"


async def _concurrent(
    base: str, concurrency: int, seconds: float, offset: int
) -> tuple[int, float, float]:
    counter = iter(range(offset, offset + 10**9))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:

        async def one() -> None:
            body = {"model": SERVED_MODEL, "input": [_text(next(counter))]}
            (await http.post("/embeddings", json=body)).raise_for_status()

        await asyncio.gather(*(one() for _ in range(concurrency)))  # warm the connections
        done = 0
        cpu = time.process_time()
        start = time.perf_counter()
        stop = start + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await one()
                done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lone", type=int, default=30, help="sequential single-text requests")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import numpy as np
    from sentence_transformers import SentenceTransformer

    from mneme.config import EmbedderConfig

    model_path = EmbedderConfig().resolved_model_path()
    ensure_infinity_venv(ROOT)
    probes = [_text(-1), "Lisbon in spring", "a longer memory: " + "the user likes tea. " * 20]
    ours = SentenceTransformer(model_path, device="cpu", local_files_only=True).encode(
        probes, normalize_embeddings=True, convert_to_numpy=True
    )
    with infinity_server(model_path, batch_size=args.batch_size) as base:
        with httpx.Client(base_url=base, timeout=60) as http:
            r = http.post("/embeddings", json={"model": SERVED_MODEL, "input": probes})
            r.raise_for_status()
            theirs = np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
            theirs /= np.linalg.norm(theirs, axis=1, keepdims=True)
            cosines = (theirs * ours).sum(axis=1)
            print(f"vectors: dim {theirs.shape[1]}, cosine vs ours min {cosines.min():.6f}")
            if cosines.min() <= 0.999:
                raise SystemExit(f"Infinity's vectors differ from ours: cosines {cosines}")

            for i in range(5):  # warm
                http.post("/embeddings", json={"model": SERVED_MODEL, "input": [_text(10**8 + i)]})
            lone = []
            for i in range(args.lone):
                body = {"model": SERVED_MODEL, "input": [_text(i)]}
                start = time.perf_counter()
                http.post("/embeddings", json=body).raise_for_status()
                lone.append(time.perf_counter() - start)
            s = summary_ms(lone)
            print(f"lone: {s['n']} sequential requests, p50 {s['p50_ms']:.1f} ms", end=", ")
            print(f"p95 {s['p95_ms']:.1f} ms")

        done, elapsed, cpu = asyncio.run(_concurrent(base, args.concurrency, args.seconds, 10**6))
        print(
            f"concurrent: {args.concurrency} clients, {done} single-text requests in "
            f"{elapsed:.1f} s = {done / elapsed:.0f} texts/s "
            f"(client CPU {cpu / elapsed:.0%} of a core)"
        )


if __name__ == "__main__":
    main()
