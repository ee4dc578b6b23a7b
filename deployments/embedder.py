"""Embedder deployment: sentence-transformers behind `@serve.batch`.

One handle call carries all texts of one HTTP request; `@serve.batch` merges concurrent calls
into one `encode`. The batch knobs come from `user_config`, so they change without a restart.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
from ray import serve

from deployments.replica import max_ongoing_requests
from mneme.config import BatchConfig, EmbedderConfig, parse_batch_config
from mneme.records import BatchStats, Embeddings

ENCODE_BATCH_SIZE = 64  # texts per forward pass inside one served batch


@serve.deployment(
    max_ongoing_requests=64,  # must exceed max_batch_size or Serve caps the batch (DESIGN.md)
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
)
class Embedder:
    """Encodes lists of texts into L2-normalised float32 vectors, batching concurrent calls."""

    def __init__(self, config: EmbedderConfig):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._config = config
        self._model = SentenceTransformer(
            config.resolved_model_path(), device=config.device, local_files_only=True
        )
        self.dim = int(self._model.get_sentence_embedding_dimension())
        self._stats = BatchStats()
        self._active = 0  # embed calls in this replica right now
        self._encoded_at_once = 0
        self._batch = config.batch
        self._apply(config.batch)

    def reconfigure(self, user_config: dict | None) -> None:
        self._apply(parse_batch_config(user_config, self._config.batch))

    def _apply(self, batch: BatchConfig) -> None:
        self._batch = batch
        self._embed_batch.set_max_batch_size(batch.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)

    async def embed(self, texts: list[str]) -> Embeddings:
        """Vectors (len(texts), dim) float32 with L2-normalised rows, and token counts.

        A call that finds the replica idle is encoded at once: waiting out the batch window
        only pays when other calls can join the batch.
        """
        idle = self._active == 0 and self._config.encode_at_once_when_idle
        self._active += 1
        try:
            if idle:
                self._stats.record(1, len(texts))
                self._encoded_at_once += 1
                vectors, tokens = await asyncio.to_thread(self._encode, texts)
                return Embeddings(vectors, tokens)
            return await self._embed_batch(texts)
        finally:
            self._active -= 1

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _embed_batch(self, calls: list[list[str]]) -> list[Embeddings]:
        flat = [text for texts in calls for text in texts]
        self._stats.record(len(calls), len(flat))
        # encode off the event loop, so new calls queue up for the next batch meanwhile
        vectors, tokens = await asyncio.to_thread(self._encode, flat)
        out, start = [], 0
        for texts in calls:
            end = start + len(texts)
            out.append(Embeddings(vectors[start:end], tokens[start:end]))
            start = end
        return out

    def _encode(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        limit = self._model.max_seq_length
        encoded = self._model.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        vectors = self._model.encode(
            texts,
            batch_size=ENCODE_BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32), [len(ids) for ids in encoded]

    def stats(self) -> dict:
        return {
            **self._stats.summary(),
            **self._batch.model_dump(),
            "max_ongoing_requests": max_ongoing_requests(),
            "encoded_at_once": self._encoded_at_once,
        }
