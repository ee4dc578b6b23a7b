"""The one place the Router calls its downstream deployments.

Every call goes through `_call`, which applies the request's deadline and turns Ray Serve's
failures into Mneme errors (a full or dead downstream is a 503, never a bare 500). The
priority scheduler and the compute cache wrap this class.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from mneme.coalesce import Coalescer, split_list
from mneme.config import RouterConfig
from mneme.errors import DeadlineExceeded, MnemeError, Overloaded, Unavailable
from mneme.priority import RequestContext
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
from mneme.scheduler import Lease, Preempted, PriorityScheduler

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAMES = {
    "embedder": "Embedder",
    "vector_search": "VectorSearch",
    "generator": "Generator",
}


class WriteNotSent(Exception):
    """A write whose request was gone by the time it could be sent: nothing was written."""


_UNAVAILABLE = (ActorDiedError, ActorUnavailableError, RayActorError, DeploymentUnavailableError)


def _method_missing(exc: BaseException, method: str) -> bool:
    """Serve's answer to a call of a method that the replica's class lacks: a replica of an
    earlier release, while an upgrade replaces them (read off Ray 2.60's replica)."""
    cause = str(getattr(exc, "cause", exc))  # a RayTaskError wraps the replica's exception
    return isinstance(exc, RayServeException) and f"method '{method}' that does not" in cause


def _translate(exc: BaseException, name: str) -> Exception | None:
    """The error to raise for `exc` from a call to `name`; None: `exc` itself."""
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, MnemeError):
        # raised in the replica: Ray's wrapper is of both classes, but the class's defaults
        # (retry_after_s None, say) hide what the replica's error was given
        return exc.cause
    if isinstance(exc, BackPressureError):
        return Overloaded(f"{name} is at capacity; retry shortly", retry_after_s=1.0)
    if isinstance(exc, _UNAVAILABLE):
        return Unavailable(f"{name} is unavailable (replica restarting?)", retry_after_s=2.0)
    if isinstance(exc, RequestCancelledError):
        return Unavailable(f"{name} cancelled the request", retry_after_s=1.0)
    return None


class Downstreams:
    """Typed calls to Embedder, VectorSearch and Generator, with deadlines and error mapping.

    With `schedulers` (one per downstream key), a call starts only once the priority
    scheduler gives it a slot of that downstream's budget.
    """

    def __init__(
        self,
        embedder: DeploymentHandle,
        vector_search: DeploymentHandle,
        generator: DeploymentHandle,
        schedulers: dict[str, PriorityScheduler] | None = None,
        router: RouterConfig | None = None,
    ):
        self.embedder = embedder
        self.vector_search = vector_search
        self.generator = generator
        self.schedulers = schedulers or {}
        self.router = router = router or RouterConfig()
        # Concurrent requests' embeds and searches go to their deployment as one call each.
        self.embed_coalescer = self._coalescer(
            lambda texts: self.embedder.embed.remote(texts), Embeddings.split
        )
        self.search_coalescer = self._coalescer(
            lambda queries: self.vector_search.search_many.remote(queries)
        )
        self.searches_sent_alone = 0  # merged, but answered by a replica without search_many

    def _coalescer(self, call, split=split_list) -> Coalescer | None:
        if not self.router.coalesce:
            return None
        return Coalescer(
            call,
            split=split,
            max_in_flight=self.router.coalesce_max_in_flight,
            max_items=self.router.coalesce_max_items,
        )

    def _merged_calls(self) -> list[tuple[str, str, Coalescer]]:
        """(downstream key, stats name, coalescer) of each merged call (none when off)."""
        merged = (
            ("embedder", "embed", self.embed_coalescer),
            ("vector_search", "search", self.search_coalescer),
        )
        return [(key, name, coalescer) for key, name, coalescer in merged if coalescer is not None]

    def coalesced(self) -> dict[str, dict[str, float]]:
        """Each merged call's stats: calls made, requests' submissions and items they carried
        (and the searches sent again alone, to a replica without `search_many`)."""
        out = {name: coalescer.stats() for _, name, coalescer in self._merged_calls()}
        if "search" in out:
            out["search"]["sent_alone"] = self.searches_sent_alone
        return out

    def follow_replicas(self, running: dict[str, int], routers: int) -> None:
        """Merged calls in flight: `coalesce_max_in_flight` per running replica of the
        deployment, shared among the Router replicas (autoscaling changes both)."""
        for key, _, coalescer in self._merged_calls():
            replicas = running.get(DEPLOYMENT_NAMES[key], 1)
            per_router = self.router.coalesce_max_in_flight * replicas // routers
            coalescer.max_in_flight = max(1, per_router)

    def _slot(
        self,
        key: str,
        ctx: RequestContext,
        preemptible: bool = False,
        resume: Lease | None = None,
    ):
        scheduler = self.schedulers.get(key)
        if scheduler is None:
            return contextlib.nullcontext(Lease.unscheduled(ctx))
        return scheduler.slot(ctx, preemptible=preemptible, resume=resume)

    async def _call(
        self,
        key: str,
        start: Callable[[int, Lease], DeploymentResponse | asyncio.Future],
        ctx: RequestContext,
        preemptible: bool = False,
        write: bool = False,
        abandoned: Callable[[], bool] | None = None,
    ) -> Any:
        """`start(attempt, lease)` sends the call; a preemptible one whose slot a more
        urgent request takes is cancelled and sent again (attempt 1) once it gets a slot
        back. A `write` is sent only while the deadline has not passed, and once sent it is
        waited for: it cannot be taken back, so a 504 must mean that it was not made.
        `abandoned()` true once the slot is granted (the request is gone): nothing is sent
        (`WriteNotSent`), so a write its client gave up on cannot land after a later one."""
        name = DEPLOYMENT_NAMES[key]
        resume = None
        for attempt in itertools.count():
            async with self._slot(key, ctx, preemptible, resume) as lease:
                if abandoned is not None and abandoned():
                    raise WriteNotSent(f"the request was gone before its call to {name}")
                remaining = ctx.remaining_s()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded(f"deadline passed before calling {name}")
                response = start(attempt, lease)
                try:
                    return await lease.watch(_awaited(response), None if write else remaining)
                except Preempted:
                    response.cancel()
                    resume = lease
                except TimeoutError:
                    response.cancel()
                    raise DeadlineExceeded(f"deadline passed while waiting for {name}") from None
                except Exception as exc:
                    mapped = _translate(exc, name)
                    if mapped is None:
                        raise
                    raise mapped from exc

    # ------------------------------------------------------------------ Embedder
    async def embed(self, texts: list[str], ctx: RequestContext) -> Embeddings:
        """One Embedder call, merged with other requests' concurrent embeds when coalescing
        (each request still takes its own scheduler slot, so priorities hold)."""
        if self.embed_coalescer is not None:
            merged = self.embed_coalescer
            return await self._call(
                "embedder", lambda _, lease: merged.submit(texts, lease.dispatched_class), ctx
            )
        return await self._call("embedder", lambda *_: self.embedder.embed.remote(texts), ctx)

    # -------------------------------------------------------------- VectorSearch
    async def upsert(
        self,
        namespace: str,
        items: list[NewMemory],
        vectors: np.ndarray,
        ctx: RequestContext,
        abandoned: Callable[[], bool] | None = None,
    ) -> list[str]:
        return await self._call(
            "vector_search",
            lambda *_: self.vector_search.upsert.remote(namespace, items, vectors),
            ctx,
            write=True,
            abandoned=abandoned,
        )

    async def search(self, query: SearchQuery, ctx: RequestContext) -> list[SearchHit]:
        """One VectorSearch call, merged with other requests' concurrent searches when
        coalescing (each request still takes its own scheduler slot, as for embeds). A
        merged call that reached a replica of a release before `search_many` (Serve upgrades
        every deployment of the application at once, so a new Router may meet an old
        VectorSearch) is sent again as this request's own `search` call."""
        if self.search_coalescer is not None:
            merged = self.search_coalescer
            try:
                [hits] = await self._call(
                    "vector_search",
                    lambda _, lease: merged.submit([query], lease.dispatched_class),
                    ctx,
                )
                return hits
            except RayServeException as exc:
                if not _method_missing(exc, "search_many"):
                    raise
            if self.searches_sent_alone == 0:
                logger.warning(
                    "a VectorSearch replica has no search_many (an earlier release, while an "
                    "upgrade runs?): sending such searches one call each"
                )
            self.searches_sent_alone += 1
        return await self._call(
            "vector_search", lambda *_: self.vector_search.search.remote(query), ctx
        )

    async def get(self, namespace: str, memory_id: str, ctx: RequestContext) -> StoredMemory | None:
        return await self._call(
            "vector_search", lambda *_: self.vector_search.get.remote(namespace, memory_id), ctx
        )

    async def delete(
        self,
        namespace: str,
        memory_id: str,
        ctx: RequestContext,
        abandoned: Callable[[], bool] | None = None,
    ) -> bool:
        return await self._call(
            "vector_search",
            lambda *_: self.vector_search.delete.remote(namespace, memory_id),
            ctx,
            write=True,
            abandoned=abandoned,
        )

    async def page(
        self, namespace: str, limit: int, cursor: int | None, ctx: RequestContext
    ) -> MemoryPage:
        return await self._call(
            "vector_search",
            lambda *_: self.vector_search.page.remote(namespace, limit, cursor),
            ctx,
        )

    # ----------------------------------------------------------------- Generator
    async def generate(self, request: GenerationRequest, ctx: RequestContext) -> Generation:
        """Preemptible: nothing has reached the client yet, so a critical or high request may
        take its slot; it is then generated again, under a new vLLM request id. vLLM gets the
        class the request was dispatched at (aged, for one that waited long), so its own
        queue does not undo the aging."""

        def start(attempt: int, lease: Lease) -> DeploymentResponse:
            retry = f"-preempted{attempt}" if attempt else ""
            sent = dataclasses.replace(
                request,
                request_id=request.request_id + retry,
                priority=min(request.priority, lease.dispatched_class),
            )
            return self.generator.generate.remote(sent)

        return await self._call("generator", start, ctx, preemptible=True)

    async def generate_stream(
        self, request: GenerationRequest, ctx: RequestContext
    ) -> AsyncIterator[GenerationDelta]:
        async with self._slot("generator", ctx) as lease:  # held for the whole stream
            aged = min(request.priority, lease.dispatched_class)  # as `generate` sends it
            request = dataclasses.replace(request, priority=aged)
            stream = self.generator.options(stream=True).generate_stream.remote(request)
            try:
                while True:  # each delta waited for no longer than the deadline leaves
                    try:
                        delta = await asyncio.wait_for(anext(stream), ctx.remaining_s())
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        stream.cancel()
                        raise DeadlineExceeded(
                            "deadline passed while streaming from Generator"
                        ) from None
                    yield delta
            except Exception as exc:
                mapped = _translate(exc, "Generator")
                if mapped is None:
                    raise
                raise mapped from exc

    def _handles(self) -> dict[str, DeploymentHandle]:
        return {
            "embedder": self.embedder,
            "vector_search": self.vector_search,
            "generator": self.generator,
        }

    async def stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Each downstream's `stats()`, all within one `timeout_s`; one that does not answer
        in time reports its error."""

        async def answer(call: DeploymentResponse) -> Any:
            try:
                return await asyncio.wait_for(_awaited(call), timeout_s)
            except Exception as exc:  # stats must answer even while a replica is down
                call.cancel()
                return {"error": type(exc).__name__}

        calls = {name: h.stats.remote() for name, h in self._handles().items()}
        return dict(zip(calls, await asyncio.gather(*map(answer, calls.values())), strict=True))


async def _awaited(response: DeploymentResponse) -> Any:
    return await response
