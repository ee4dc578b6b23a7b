"""Serving logic of the ingress: plain classes from protocol requests to protocol responses.

No HTTP here (that is router.py) and no Ray handles (that is downstreams.py).
"""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TypeVar

from cache.keys import normalise_text
from deployments.compute import ComputeGraph
from mneme import protocol as p
from mneme.config import MnemeConfig
from mneme.errors import ContextLengthExceeded, InvalidRequest, MnemeError, NotFound
from mneme.priority import RequestContext
from mneme.records import GenerationRequest, MemoryContext, NewMemory, SearchHit

T = TypeVar("T")


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex


def _hit(h: SearchHit) -> p.Hit:
    return p.Hit(id=h.id, text=h.text, score=h.score, metadata=h.metadata)


class MnemeService:
    """Embeddings, memories, answers and chat, composed from the three downstreams."""

    def __init__(self, config: MnemeConfig, compute: ComputeGraph):
        self.config = config
        self.limits = config.limits
        self.compute = compute
        self.embedding_model = config.embedder.model_name
        self.chat_model = config.generator.served_model_name
        self._embedding_dim: int | None = None  # learnt once, when a request names one

    # ---------------------------------------------------------------- models
    def models(self) -> p.ModelList:
        return p.ModelList(
            data=[p.ModelCard(id=self.chat_model), p.ModelCard(id=self.embedding_model)]
        )

    def _check_model(self, requested: str | None, served: str) -> None:
        if requested is not None and requested != served:
            raise NotFound(
                f"model {requested!r} is not served here; use {served!r}",
                param="model",
                code="model_not_found",
            )

    # ------------------------------------------------------------ embeddings
    async def embeddings(self, req: p.EmbeddingRequest, ctx: RequestContext) -> p.EmbeddingResponse:
        req.check_limits(self.limits)
        self._check_model(req.model, self.embedding_model)
        if req.dimensions is not None:  # before any compute
            await self._check_dimensions(req.dimensions, ctx)
        result = await self.compute.embed(req.texts(), ctx)
        data = []
        for i, vector in enumerate(result.vectors):
            if req.encoding_format == "base64":
                value = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
            else:
                value = vector.tolist()
            data.append(p.EmbeddingData(index=i, embedding=value))
        tokens = sum(result.token_counts)
        return p.EmbeddingResponse(
            data=data,
            model=self.embedding_model,
            usage=p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

    async def _check_dimensions(self, dimensions: int, ctx: RequestContext) -> None:
        """Vectors are not shortened: `dimensions` may only name the model's own size (learnt
        once per Router replica from a probe text, before the request's texts are embedded)."""
        if self._embedding_dim is None:
            self._embedding_dim = await self.compute.embedding_dimension(ctx)
        if dimensions != self._embedding_dim:
            raise InvalidRequest(
                f"this model has {self._embedding_dim} dimensions", param="dimensions"
            )

    async def prewarm(self, req: p.PrewarmRequest, ctx: RequestContext) -> p.PrewarmResponse:
        req.check_limits(self.limits)
        await self.compute.embed(list(req.texts), ctx)
        computed = ctx.cache_tiers.count("miss") if ctx.cache_tiers else len(req.texts)
        if not ctx.reveal_cache:
            return p.PrewarmResponse(texts=len(req.texts), already_cached=None, computed=None)
        return p.PrewarmResponse(
            texts=len(req.texts), already_cached=len(req.texts) - computed, computed=computed
        )

    # -------------------------------------------------------------- memories
    async def add_memories(
        self, req: p.AddMemoriesRequest, ctx: RequestContext
    ) -> p.AddMemoriesResponse:
        req.check_limits(self.limits)
        items = [NewMemory(i.id or new_id("mem_"), i.text, i.metadata) for i in req.items]
        try:
            ids = await self.compute.upsert(req.namespace, items, ctx)
        except MnemeError as exc:
            if exc.status_code < 500:
                raise
            # the write may stand: a retry with its ids replaces it. A copy: one error of a
            # merged downstream call reaches every request in it
            error = copy.copy(exc)
            error.details = {**exc.details, "ids": [item.id for item in items]}
            raise error from exc
        return p.AddMemoriesResponse(ids=ids)

    async def _retrieve(
        self, namespace: str, query: str, top_k: int, flt: dict | None, ctx: RequestContext
    ) -> list[SearchHit]:
        return await self.compute.retrieve(namespace, query, top_k, flt, ctx)

    async def search(self, req: p.SearchRequest, ctx: RequestContext) -> p.SearchResponse:
        req.check_limits(self.limits)
        hits = await self._retrieve(req.namespace, req.query, req.top_k, req.filter, ctx)
        return p.SearchResponse(hits=[_hit(h) for h in hits])

    async def get_memory(self, namespace: str, memory_id: str, ctx: RequestContext) -> p.Memory:
        p.check_memory_id(memory_id)
        stored = await self.compute.get(namespace, memory_id, ctx)
        if stored is None:
            raise NotFound(f"no memory {memory_id!r} in namespace {namespace!r}", param="id")
        return p.Memory(
            id=stored.id, namespace=stored.namespace, text=stored.text, metadata=stored.metadata
        )

    async def delete_memory(
        self, namespace: str, memory_id: str, ctx: RequestContext
    ) -> p.DeleteResponse:
        p.check_memory_id(memory_id)
        if not await self.compute.delete(namespace, memory_id, ctx):
            raise NotFound(f"no memory {memory_id!r} in namespace {namespace!r}", param="id")
        return p.DeleteResponse(id=memory_id, deleted=True)

    async def list_memories(
        self, namespace: str, limit: int, cursor: str | None, ctx: RequestContext
    ) -> p.MemoryList:
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be in [1, 1000]", param="limit")
        after = None
        if cursor:
            if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
                raise InvalidRequest("cursor is not one this service returned", param="cursor")
            after = int(cursor)
        page = await self.compute.page(namespace, limit, after, ctx)
        data = [
            p.Memory(id=m.id, namespace=m.namespace, text=m.text, metadata=m.metadata)
            for m in page.memories
        ]
        return p.MemoryList(data=data, next_cursor=page.next_cursor)

    # ------------------------------------------------------------ generation
    def _memory_context(self, hits: list[SearchHit]) -> MemoryContext:
        return MemoryContext(self.config.answer_system_prompt, tuple(h.text for h in hits))

    def _max_tokens(self, requested: int | None) -> int:
        return requested or self.config.generator.default_max_tokens

    async def answer(self, req: p.AnswerRequest, ctx: RequestContext) -> p.AnswerResponse:
        req.check_limits(self.limits)
        # deterministic: one answer per namespace version, one generation per prompt
        deterministic = req.temperature == 0

        async def produce() -> tuple[str, list[SearchHit]]:
            hits = await self._retrieve(req.namespace, req.query, req.top_k, req.filter, ctx)
            request = GenerationRequest(
                request_id=new_id("answer-"),
                messages=[("user", req.query)],
                max_tokens=self._max_tokens(req.max_tokens),
                temperature=req.temperature,
                priority=int(ctx.priority),
                context=self._memory_context(hits),
            )
            try:
                if deterministic:
                    generation = await self.compute.generate_answer(request, req.namespace, ctx)
                else:
                    generation = await self.compute.generate(request, ctx)
            except ContextLengthExceeded as exc:  # the query alone is longer than the context
                raise ContextLengthExceeded(exc.message, param="query") from None
            return generation.text, hits[: generation.memories_used]  # the ones it was given

        if deterministic:
            payload = [
                normalise_text(req.query),
                req.top_k,
                req.filter,
                self._max_tokens(req.max_tokens),
                self.config.answer_system_prompt,
            ]
            key = self.compute.answer_key(req.namespace, payload)

            async def produce_or_similar() -> tuple[str, list[SearchHit]]:
                return await self.compute.semantic(
                    req.namespace, req.query, payload[1:], produce, ctx
                )

            text, hits = await self.compute.cached(key, produce_or_similar, ctx)
        else:
            text, hits = await produce()
        return p.AnswerResponse(
            answer=text, memories=[_hit(h) for h in hits], model=self.chat_model
        )

    async def _generation_request(
        self, req: p.ChatCompletionRequest, ctx: RequestContext, request_id: str
    ) -> GenerationRequest:
        req.check_limits(self.limits)
        self._check_model(req.model, self.chat_model)
        messages = [(m.role, m.text()) for m in req.messages]
        context = None
        if req.memory is not None:
            query = next((text for role, text in reversed(messages) if role == "user"), None)
            if query is None or not query.strip():
                raise InvalidRequest("memory retrieval needs a user message", param="messages")
            mem = req.memory
            hits = await self._retrieve(mem.namespace, query, mem.top_k, mem.filter, ctx)
            context = self._memory_context(hits)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenerationRequest(
            request_id=request_id,
            messages=messages,
            max_tokens=self._max_tokens(req.requested_max_tokens()),
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stop=stop,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            priority=int(ctx.priority),
            context=context,
        )

    async def chat(
        self, req: p.ChatCompletionRequest, ctx: RequestContext
    ) -> p.ChatCompletionResponse:
        request_id = new_id("chatcmpl-")
        generation = await self.compute.generate(
            await self._generation_request(req, ctx, request_id),
            ctx,
            cacheable=req.temperature == 0 or req.seed is not None,
            namespace=req.memory.namespace if req.memory else None,
        )
        return p.ChatCompletionResponse(
            id=request_id,
            model=self.chat_model,
            choices=[
                p.ChatChoice(
                    message=p.ChatResponseMessage(content=generation.text),
                    finish_reason=generation.finish_reason,
                )
            ],
            usage=p.Usage(
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                total_tokens=generation.prompt_tokens + generation.completion_tokens,
            ),
        )

    async def chat_stream(
        self, req: p.ChatCompletionRequest, ctx: RequestContext
    ) -> AsyncIterator[str]:
        """Server-sent events. Validation, retrieval and the prompt's rendering run before the
        first byte is sent: until the first delta arrives an error is still a status code."""
        request_id = new_id("chatcmpl-")
        generation_request = await self._generation_request(req, ctx, request_id)
        stream = self.compute.generate_stream(generation_request, ctx)
        first = await anext(stream, None)
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: p.ChatDelta, finish: str | None = None, usage=None) -> str:
            body = p.ChatCompletionChunk(
                id=request_id,
                created=created,
                model=self.chat_model,
                choices=[] if usage else [p.ChatChunkChoice(delta=delta, finish_reason=finish)],
                usage=usage,
            )
            return f"data: {body.model_dump_json(exclude_none=usage is None)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk(p.ChatDelta(role="assistant", content=""))
            prompt_tokens = completion_tokens = 0
            try:
                async for delta in _prepend(first, stream):
                    prompt_tokens = delta.prompt_tokens or prompt_tokens
                    completion_tokens = delta.completion_tokens or completion_tokens
                    if delta.text or delta.finish_reason:
                        yield chunk(p.ChatDelta(content=delta.text or None), delta.finish_reason)
            except Exception as exc:  # headers are sent: report the error in-band, as OpenAI does
                yield f"data: {json.dumps(_error_body(exc))}\n\n"
                return
            if include_usage:
                usage = p.Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens,
                )
                yield chunk(p.ChatDelta(), usage=usage)
            yield "data: [DONE]\n\n"

        return events()


async def _prepend(first: T | None, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    if first is not None:
        yield first
    async for item in rest:
        yield item


def _error_body(exc: Exception) -> dict:
    if isinstance(exc, MnemeError):
        return exc.to_body()
    return MnemeError("internal error while streaming").to_body()
