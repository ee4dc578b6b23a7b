"""The compute path of the ingress: downstream calls with the compute cache in front.

Everything `MnemeService` computes goes through here. Embeddings are cached per text
(content-addressed), searches and answers per namespace version, deterministic generations
per prompt (and namespace, where the prompt holds its memories); writes bump the
namespace's version before they are acknowledged. Without a cache (the naive graph) every
call goes straight to the downstreams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import numpy as np

from cache.client import CacheClient
from cache.keys import (
    KeyRequest,
    Kind,
    digest,
    embedding_key,
    namespaced_key,
    normalise_text,
    prompt_key,
)
from deployments.downstreams import Downstreams, WriteNotSent
from mneme.coalesce import detached, fire_and_forget
from mneme.config import MnemeConfig
from mneme.errors import Unavailable
from mneme.priority import COMPUTED, RequestContext
from mneme.records import (
    Embeddings,
    Generation,
    GenerationDelta,
    GenerationRequest,
    MemoryPage,
    NewMemory,
    SearchHit,
    SearchQuery,
    StoredMemory,
)

T = TypeVar("T")
DIMENSION_PROBE = "What size are this model's vectors?"


def _dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


class ComputeGraph:
    """Typed, cached access to Embedder, VectorSearch and Generator."""

    def __init__(
        self, config: MnemeConfig, downstreams: Downstreams, cache: CacheClient | None = None
    ):
        self.config = config
        self.down = downstreams
        self.cache = cache
        self.embedding_cache_id = config.embedder.cache_id()
        # an answer depends on both models: what retrieval found and what generated from it
        self.answer_cache_id = f"{config.generator.cache_id()}+{self.embedding_cache_id}"
        self._writes: set[asyncio.Future] = set()  # running on after their request is gone

    @staticmethod
    def _uncached(ctx: RequestContext) -> RequestContext:
        """For a model call no cache lookup stands for: X-Cache then says miss (if the
        request looked anything up)."""
        ctx.cache_tiers.append(COMPUTED)
        return ctx

    async def cached(
        self, key: KeyRequest, produce: Callable[[], Awaitable[T]], ctx: RequestContext
    ) -> T:
        """One value through the cache (single flight included)."""
        if self.cache is None:
            return await produce()

        async def compute(_: list[int]) -> list[bytes]:
            return [_dumps(await produce())]

        [value] = await self.cache.get_or_compute(
            [key], compute, ctx.cache_tiers, ctx.remaining_s(), ctx.priority
        )
        return pickle.loads(value)

    def answer_key(self, namespace: str, payload: Any) -> KeyRequest:
        """A deterministic answer's key: both models, the namespace (and its version)."""
        return namespaced_key(Kind.ANSWER, self.answer_cache_id, namespace, payload)

    async def semantic(
        self,
        namespace: str,
        query: str,
        params: Any,
        produce: Callable[[], Awaitable[T]],
        ctx: RequestContext,
    ) -> T:
        """The optional semantic answer cache: a result cached for a query whose embedding is
        within `cache.semantic_answer_threshold` (cosine) of this one, in the same namespace,
        version and `params`. Off (straight to `produce`) unless configured."""
        threshold = self.config.cache.semantic_answer_threshold
        if threshold is None or self.cache is None:
            return await produce()
        vector = (await self.embed([query], ctx)).vectors[0]
        bucket = digest([self.answer_cache_id, params])
        version, found = await self.cache.semantic_lookup(namespace, bucket, vector, threshold)
        if found is not None:
            ctx.cache_tiers[:] = ["hit-semantic"]
            return pickle.loads(found)
        value = await produce()
        if version is not None:
            self.cache.semantic_add(namespace, bucket, version, vector, _dumps(value))
        return value

    # ----------------------------------------------------------------- embeddings
    async def embed(self, texts: list[str], ctx: RequestContext) -> Embeddings:
        """The model embeds each text as its cache key names it (`normalise_text`), so a
        cached vector is the one its key promises: two texts that share a key (one with
        control characters that Python counts as spaces and the tokenizer drops, say) never
        share a vector that only one of them would get. Namespaces share this cache."""
        texts = [normalise_text(text) for text in texts]
        if self.cache is None:
            return await self.down.embed(texts, ctx)

        async def compute(indices: list[int]) -> list[bytes]:
            result = await self.down.embed([texts[i] for i in indices], ctx)
            return [
                _dumps((result.vectors[j], result.token_counts[j])) for j in range(len(indices))
            ]

        keys = [embedding_key(self.embedding_cache_id, text) for text in texts]
        values = await self.cache.get_or_compute(
            keys, compute, ctx.cache_tiers, ctx.remaining_s(), ctx.priority
        )
        pairs = [pickle.loads(v) for v in values]
        return Embeddings(
            np.stack([p[0] for p in pairs]).astype(np.float32), [int(p[1]) for p in pairs]
        )

    async def embedding_dimension(self, ctx: RequestContext) -> int:
        """The size of the model's vectors, from a fixed probe text (cached after the first
        time), under a context of its own so that it does not set the request's X-Cache."""
        probe = RequestContext(priority=ctx.priority, deadline=ctx.deadline)
        return int((await self.embed([DIMENSION_PROBE], probe)).vectors.shape[1])

    # ----------------------------------------------------------------- memories
    async def retrieve(
        self,
        namespace: str,
        query: str,
        top_k: int,
        flt: dict[str, Any] | None,
        ctx: RequestContext,
    ) -> list[SearchHit]:
        async def search() -> list[SearchHit]:
            vector = (await self.embed([query], ctx)).vectors[0]
            return await self.down.search(SearchQuery(namespace, vector, top_k, flt), ctx)

        key = namespaced_key(
            Kind.SEARCH, self.embedding_cache_id, namespace, [normalise_text(query), top_k, flt]
        )
        return await self.cached(key, search, ctx)

    async def upsert(
        self, namespace: str, items: list[NewMemory], ctx: RequestContext
    ) -> list[str]:
        embedded = await self.embed([item.text for item in items], ctx)
        return await self._write(
            namespace,
            lambda gone: self.down.upsert(namespace, items, embedded.vectors, ctx, gone),
        )

    async def delete(self, namespace: str, memory_id: str, ctx: RequestContext) -> bool:
        """True when the memory was there. One that found nothing bumps the version all the
        same: it may be the retry of a delete that landed while its bump failed (a 503 says
        retrying is safe), and that retry is what invalidates the results still holding it."""
        return await self._write(
            namespace, lambda gone: self.down.delete(namespace, memory_id, ctx, gone)
        )

    async def _write(
        self, namespace: str, write: Callable[[Callable[[], bool]], Awaitable[T]]
    ) -> T:
        """`write(gone)`, then the namespace's version bump, even when the write fails (it may
        have landed part-way) and even when the request is cancelled meanwhile (its client
        gone): the bump must follow the write, or a search between the two would cache the
        old view under the new version. A write still queued for its slot when its request
        is cancelled is not sent (`gone()` is then true), so it cannot land after a write the
        client made next."""
        cancelled = False

        def gone() -> bool:
            return cancelled

        async def bump() -> bool:
            return self.cache is None or await self.cache.bump(namespace)

        async def write_then_bump() -> T:
            try:
                written = await write(gone)
            except WriteNotSent:
                raise
            except BaseException:
                await bump()
                raise
            if not await bump():
                raise Unavailable(
                    f"the write to namespace {namespace!r} is stored, but its cached searches "
                    "and answers could not be invalidated yet (cache actor slow or "
                    "restarting; the Router keeps trying); retrying with the same ids is safe",
                    retry_after_s=2.0,
                )
            return written

        task = detached(write_then_bump(), self._writes)  # not cancelled with its request
        fire_and_forget(task)  # its failure is reported to the request, if it is still there
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
            raise

    async def get(self, namespace: str, memory_id: str, ctx: RequestContext) -> StoredMemory | None:
        return await self.down.get(namespace, memory_id, ctx)

    async def page(
        self, namespace: str, limit: int, cursor: int | None, ctx: RequestContext
    ) -> MemoryPage:
        return await self.down.page(namespace, limit, cursor, ctx)

    # ---------------------------------------------------------------- generation
    def generate_stream(
        self, request: GenerationRequest, ctx: RequestContext
    ) -> AsyncIterator[GenerationDelta]:
        return self.down.generate_stream(request, self._uncached(ctx))

    async def generate(
        self,
        request: GenerationRequest,
        ctx: RequestContext,
        cacheable: bool = False,
        namespace: str | None = None,
    ) -> Generation:
        """A generation, cached as a chat completion when `cacheable` (the output is a
        function of the request: temperature 0 or a seed); `namespace`: the one whose
        memories the prompt holds."""
        if not (cacheable and self.config.cache.cache_chat):
            return await self.down.generate(request, self._uncached(ctx))
        return await self._generate_cached(Kind.CHAT, request, namespace, ctx)

    async def generate_answer(
        self, request: GenerationRequest, namespace: str, ctx: RequestContext
    ) -> Generation:
        """An answer's generation at temperature 0, cached by namespace and prompt: an add
        that leaves a question's memories as they were costs its next answer a search, not a
        generation."""
        return await self._generate_cached(Kind.GENERATION, request, namespace, ctx)

    async def _generate_cached(
        self, kind: Kind, request: GenerationRequest, namespace: str | None, ctx: RequestContext
    ) -> Generation:
        payload = [
            request.messages,
            dataclasses.asdict(request.context) if request.context else None,
            request.max_tokens,
            request.temperature,
            request.top_p,
            request.seed,
            request.stop,
            request.presence_penalty,
            request.frequency_penalty,
        ]
        key = prompt_key(kind, self.config.generator.cache_id(), payload, namespace)
        return await self.cached(key, lambda: self.down.generate(request, ctx), ctx)
