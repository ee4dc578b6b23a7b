"""Embedder deployment: sentence-transformers behind `@serve.batch`.

One handle call carries all texts of one HTTP request; `@serve.batch` merges concurrent calls
into one `encode`. A call that finds the replica idle is encoded at once, and the batch window
grows with load (`mneme.batching`). The batch knobs come from `user_config`, so they change
without a restart.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
import time

# Idle OpenMP threads sleep instead of spinning: on a node shared with the proxy and the
# Router, spinning threads took CPU from them (measured: 12 -> 7.5 ms of CPU per text with 2
# threads). OpenMP reads this when torch loads, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from deployments.replica import DOWNSTREAM_LOGGING, identity, max_ongoing_requests
from mneme.batching import BatchGate
from mneme.config import EmbedderConfig, parse_batch_config
from mneme.onnx_encoder import OnnxEncoder
from mneme.records import BatchStats, Embeddings, in_callers_order

ENCODE_BATCH_SIZE = 64  # texts per forward pass inside one served batch
# A call that finds the replica idle for a while and carries at most this many texts is
# encoded on one thread: after a pause, waking a sleeping second core costs what it saves on
# so little work. Measured here with the ONNX forward, 2 threads vs 1: one text 3.9 vs 5.4 ms
# back to back, 5.7 vs 5.7 after a 15 ms pause, 7.1 vs 7.0 after 30 ms; 4 texts 9.8 vs 13.8
# back to back, 14.5 vs 14.9 after 15 ms (sentence-transformers' encode: one text 19-21 vs
# 16-17 ms after 20-30 ms). Busy replicas and bigger calls use every configured thread.
IDLE_ONE_THREAD_MAX_TEXTS = 4
IDLE_ONE_THREAD_AFTER_S = 0.015
# Bigger batches on CPU are cut into one shard per thread, each encoded on one thread, side by
# side (`EmbedderConfig.split_min_texts`). One encode over 2 threads meets a barrier at every
# op, so a thread that the proxy or the Router preempts holds up both. Measured in one process
# with the ONNX forward, texts/s split vs one session on 2 threads: 1.10x at 32 texts, 1.05x
# at 16, 0.82x at 8 (sentence-transformers' encode: 1.16x at 64, 1.08x at 32, 1.05x at 8; with
# a process beside it busy 25 % of the time, 1.24x at 64 and 1.17x at 32).

logger = logging.getLogger("ray.serve")


@serve.deployment(
    max_ongoing_requests=64,  # must exceed max_batch_size or Serve caps the batch (DESIGN.md)
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    logging_config=DOWNSTREAM_LOGGING,
)
class Embedder:
    """Encodes lists of texts into L2-normalised float32 vectors, batching concurrent calls."""

    def __init__(self, config: EmbedderConfig):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._threads = None
        self._one_thread_calls = 0
        self._split_calls = 0
        self._last_encode_end = float("-inf")  # time.monotonic()
        if config.device == "cpu":
            self._threads = config.torch_threads or os.cpu_count() or 1
            torch.set_num_threads(self._threads)
        self._config = config
        self._model = SentenceTransformer(
            config.resolved_model_path(), device=config.device, local_files_only=True
        )
        self.dim = int(self._model.get_embedding_dimension())
        self._onnx: OnnxEncoder | None = None
        if config.onnx_forward and config.device == "cpu":
            threads = (1, self._threads or 1)
            self._onnx, why_not = OnnxEncoder.of(self._model, ENCODE_BATCH_SIZE, threads)
            if why_not:
                logger.warning("embedder.onnx_forward: encoding with sentence-transformers "
                               "instead, the model cannot be exported: %s", why_not)  # fmt: skip
        if self._onnx is None:
            # Two shards of a split batch encode at once and share the model's tokenizer,
            # whose padding and truncation are settings on the tokenizer itself: transformers
            # changes them only when a call asks for others. So every call on it must ask for
            # the same (one encode now fixes them before anything runs concurrently), and
            # token counts come from a private copy: counting on the shared one switched
            # padding off between another shard's setting and its use ("Unable to create
            # tensor", a 500 on an add). The ONNX forward tokenizes once, the same way.
            self._model.encode(["warm-up"], show_progress_bar=False)
            self._counting_tokenizer = copy.deepcopy(self._model.tokenizer)
            self._counting = threading.Lock()
        self._stats = BatchStats()
        # One encode at a time: a call run at once and a batch from `@serve.batch` (several
        # Router replicas, each with a merged call in flight) would otherwise share the cores,
        # and each take about as long as both in a row.
        self._encoding = asyncio.Lock()
        self._waited = 0  # encodes that waited for another one to finish
        self._gate = BatchGate(self._embed_batch, config.batch)

    def reconfigure(self, user_config: dict | None) -> None:
        self._gate.apply(parse_batch_config(user_config, self._config.batch))

    async def embed(self, texts: list[str]) -> Embeddings:
        """Vectors (len(texts), dim) float32 with L2-normalised rows, and token counts."""
        with self._gate.admit() as at_once:
            if at_once:
                one_thread = (
                    self._threads is not None
                    and len(texts) <= IDLE_ONE_THREAD_MAX_TEXTS
                    and time.monotonic() - self._last_encode_end >= IDLE_ONE_THREAD_AFTER_S
                )
                self._one_thread_calls += one_thread
                return (await self._encode_calls([texts], 1 if one_thread else None))[0]
            return await self._embed_batch(texts)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _embed_batch(self, calls: list[list[str]]) -> list[Embeddings]:
        return await self._encode_calls(calls)

    async def _encode_calls(
        self, calls: list[list[str]], threads: int | None = None
    ) -> list[Embeddings]:
        flat = [text for texts in calls for text in texts]
        self._waited += self._encoding.locked()
        async with self._encoding:
            with self._stats.batch(len(calls), len(flat)):
                encode = asyncio.ensure_future(self._encode_split(flat, threads or self._threads))
                try:
                    vectors, tokens = await asyncio.shield(encode)
                except asyncio.CancelledError:  # its threads run on: hold the lock till then
                    await asyncio.wait([encode])
                    raise
            self._last_encode_end = time.monotonic()
        return Embeddings(vectors, tokens).split([len(texts) for texts in calls])

    async def _encode_split(
        self, texts: list[str], threads: int | None
    ) -> tuple[np.ndarray, list[int]]:
        """Encodes off the event loop (new calls queue up for the next batch meanwhile); a big
        batch on several CPU threads as one shard per thread, side by side."""
        split_min = self._config.split_min_texts
        if not threads or threads < 2 or split_min is None or len(texts) < split_min:
            return await asyncio.to_thread(self._encode, texts, threads)
        self._split_calls += 1
        # deal texts sorted by length round-robin, so the shards carry equal work
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        shards = [order[k::threads] for k in range(min(threads, len(texts)))]
        parts = await asyncio.gather(
            *(asyncio.to_thread(self._encode, [texts[i] for i in s], 1) for s in shards)
        )
        return in_callers_order(len(texts), self.dim, zip(shards, parts, strict=True))

    def _encode(self, texts: list[str], threads: int | None) -> tuple[np.ndarray, list[int]]:
        if self._onnx is not None:
            return self._onnx.encode(texts, threads or 1)
        if threads is not None:
            torch.set_num_threads(threads)  # this thread's OpenMP team for the encode below
        limit = self._model.max_seq_length
        with self._counting:
            encoded = self._counting_tokenizer(texts, truncation=True, max_length=limit)
        vectors = self._model.encode(
            texts,
            batch_size=ENCODE_BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        counts = [len(ids) for ids in encoded["input_ids"]]
        return np.ascontiguousarray(vectors, dtype=np.float32), counts

    async def stats(self) -> dict:
        return {
            **self._stats.summary(),
            **self._gate.stats(),
            "torch_threads": self._threads or torch.get_num_threads(),
            "encoded_on_one_thread": self._one_thread_calls,
            "encodes_split": self._split_calls,
            "encodes_waited": self._waited,
            "onnx_forward": self._onnx is not None,
            "max_ongoing_requests": max_ongoing_requests(),
            **identity(),
        }
