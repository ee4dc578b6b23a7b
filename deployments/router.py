"""Router: the FastAPI ingress. Binds HTTP to `MnemeService`; holds no logic of its own."""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

from fastapi import FastAPI, Header, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from cache.client import CacheClient
from deployments.api_keys import ApiKeyGate, Caller
from deployments.budgets import BudgetRefresher, make_schedulers
from deployments.compute import ComputeGraph
from deployments.downstreams import Downstreams
from deployments.http_errors import BodySizeLimit, install_error_handlers
from deployments.metrics import to_prometheus
from deployments.observed import ObservedRequests, arrival, observe
from deployments.process_env import SERVE_ENV
from deployments.replica import identity
from deployments.serving import MnemeService
from mneme import protocol as p
from mneme.auth import KeyRing, Principal
from mneme.config import NAMESPACE_PATTERN, MnemeConfig, parse_router_user_config
from mneme.errors import Forbidden
from mneme.priority import Priority, RequestContext, parse_deadline_ms
from mneme.shared_result import SharedResult

logger = logging.getLogger(__name__)
app = FastAPI(title="Mneme", version="0.1.0")
app.add_middleware(ObservedRequests)
app.add_middleware(BodySizeLimit)
app.add_middleware(ApiKeyGate)  # outermost: 401 before the body is even counted
install_error_handlers(app)

PriorityHeader = Annotated[str | None, Header(alias="X-Priority")]
DeadlineHeader = Annotated[str | None, Header(alias="X-Deadline-Ms")]
NamespaceQuery = Annotated[str, Query(pattern=NAMESPACE_PATTERN)]
HEALTH_MAX_AGE_S = 1.0  # /healthz reuses a check this young (it is public)


# Above the Router: `serve.ingress` pickles its routes, with the names they use, as the class
# is defined.
def _sees_every_namespace(caller: Principal | None) -> bool:
    """No key (auth off) or a key allowed every namespace: it may see what the shared caches
    hold (X-Cache, prewarm counts, the stats), which tells of every namespace's traffic."""
    return caller is None or caller.sees_every_namespace


def _check_sees_everything(caller: Principal | None) -> None:
    """The stats count every namespace's cache hits: a key held to some namespaces could
    learn from them what another namespace stored or asked (as it could from X-Cache)."""
    if not _sees_every_namespace(caller):
        raise Forbidden(
            f"API key {caller.name!r} may not read the stats: they count every namespace's "
            "cache hits; use a key allowed every namespace ('*')",
            code="stats_forbidden",
        )


@serve.deployment(
    max_ongoing_requests=256,
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress(app)
class Router:
    """The HTTP API of DESIGN.md; everything computed goes through one `ComputeGraph`."""

    async def __init__(
        self,
        config: MnemeConfig,
        embedder: DeploymentHandle,
        vector_search: DeploymentHandle,
        generator: DeploymentHandle,
    ):
        self.config = config
        if missing := sorted(k for k, v in SERVE_ENV.items() if os.environ.get(k) != v):
            logger.warning(
                "Serve's processes run without Mneme's settings %s (graphs/serve_env.py): "
                "`make run` sets them; for a `serve run` or `ray start` of your own, export "
                "them first. Without them the proxy keeps no body limit and every handler "
                "and handle call takes an extra thread or loop hop.",
                missing,
            )
        BodySizeLimit.max_bytes = config.limits.max_request_body_bytes
        ApiKeyGate.keyring = KeyRing(config.auth)
        app_name = serve.get_replica_context().app_name
        self.schedulers = make_schedulers(config.scheduler) if config.scheduler.enabled else {}
        self.downstreams = Downstreams(
            embedder, vector_search, generator, self.schedulers, config.router
        )
        self.budgets = BudgetRefresher(
            config.scheduler, self.schedulers, self.downstreams, app_name
        )
        self.cache = None
        if config.cache.enabled:
            self.cache = await CacheClient.connect(config.cache, app_name, config.router)
            if stale := await self.cache.stale_settings():
                logger.warning(
                    "the running cache actors keep the settings they started with, not this "
                    "config's: %s. To apply them: `serve shutdown`, then `python -m "
                    "cache.reset --app %s` (stops the detached cache actors), then deploy.",
                    ", ".join(
                        f"{k} {old!r} (configured {new!r})" for k, (old, new) in stale.items()
                    ),
                    app_name,
                )
        self.compute = ComputeGraph(config, self.downstreams, self.cache)
        self.service = MnemeService(config, self.compute)
        self.latency = ObservedRequests.latency
        self.health = SharedResult(self._unavailable_downstreams, HEALTH_MAX_AGE_S)
        if self.schedulers:
            self.budgets.start()

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """The Router's `user_config`: `{auth: {...}}` replaces the args' API keys in place, so
        a `serve deploy` rotates keys without restarting a replica or dropping a request."""
        ApiKeyGate.keyring = KeyRing(parse_router_user_config(user_config, self.config.auth))

    def _context(
        self,
        route: str,
        caller: Principal | None,
        header: str | None,
        field: str | None,
        deadline_ms: str | None,
        namespace: str | None = None,
    ) -> RequestContext:
        """The request's class and deadline, once its key is found to allow its namespace
        and class (403 otherwise, before anything is computed or changed); from here on it
        is recorded under `route` (`deployments/observed.py`)."""
        param = "priority" if field else "X-Priority"
        from_header = Priority.parse(header, param="X-Priority") if header else None
        requested = Priority.parse(field) if field else from_header  # the body's field wins
        priority = Priority.NORMAL if requested is None else requested  # CRITICAL is 0: falsy
        if caller is not None:
            if namespace is not None:
                caller.check_namespace(namespace)
            priority = caller.priority(requested, param)
        arrived = arrival()
        ctx = RequestContext(
            priority=priority,
            deadline=parse_deadline_ms(deadline_ms, arrived),
            received_at=arrived,
            reveal_cache=_sees_every_namespace(caller),
        )
        observe(route, ctx)
        return ctx

    # ------------------------------------------------------------------ OpenAI
    @app.get("/v1/models")
    async def models(self) -> p.ModelList:
        return self.service.models()

    @app.post("/v1/embeddings")
    async def embeddings(
        self,
        req: p.EmbeddingRequest,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.EmbeddingResponse:
        ctx = self._context("embeddings", caller, x_priority, req.priority, x_deadline_ms)
        return await self.service.embeddings(req, ctx)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        self,
        req: p.ChatCompletionRequest,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.ChatCompletionResponse | StreamingResponse:
        namespace = req.memory.namespace if req.memory is not None else None
        ctx = self._context("chat", caller, x_priority, req.priority, x_deadline_ms, namespace)
        if req.stream:
            events = await self.service.chat_stream(req, ctx)
            return StreamingResponse(events, media_type="text/event-stream")
        return await self.service.chat(req, ctx)

    # ----------------------------------------------------------------- memories
    @app.post("/v1/memories")
    async def add_memories(
        self,
        req: p.AddMemoriesRequest,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.AddMemoriesResponse:
        ctx = self._context(
            "memories.add", caller, x_priority, req.priority, x_deadline_ms, req.namespace
        )
        return await self.service.add_memories(req, ctx)

    @app.post("/v1/memories/search")
    async def search(
        self,
        req: p.SearchRequest,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.SearchResponse:
        ctx = self._context(
            "memories.search", caller, x_priority, req.priority, x_deadline_ms, req.namespace
        )
        return await self.service.search(req, ctx)

    @app.get("/v1/memories")
    async def list_memories(
        self,
        namespace: NamespaceQuery,
        caller: Caller,
        limit: int = 100,
        cursor: str | None = None,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.MemoryList:
        ctx = self._context("memories.list", caller, x_priority, None, x_deadline_ms, namespace)
        return await self.service.list_memories(namespace, limit, cursor, ctx)

    @app.get("/v1/memories/{memory_id}")
    async def get_memory(
        self,
        memory_id: str,
        namespace: NamespaceQuery,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.Memory:
        ctx = self._context("memories.get", caller, x_priority, None, x_deadline_ms, namespace)
        return await self.service.get_memory(namespace, memory_id, ctx)

    @app.delete("/v1/memories/{memory_id}")
    async def delete_memory(
        self,
        memory_id: str,
        namespace: NamespaceQuery,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.DeleteResponse:
        ctx = self._context("memories.delete", caller, x_priority, None, x_deadline_ms, namespace)
        return await self.service.delete_memory(namespace, memory_id, ctx)

    @app.post("/v1/answer")
    async def answer(
        self,
        req: p.AnswerRequest,
        caller: Caller,
        x_priority: PriorityHeader = None,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.AnswerResponse:
        ctx = self._context(
            "answer", caller, x_priority, req.priority, x_deadline_ms, req.namespace
        )
        return await self.service.answer(req, ctx)

    @app.post("/v1/cache/prewarm")
    async def prewarm(
        self,
        req: p.PrewarmRequest,
        caller: Caller,
        x_deadline_ms: DeadlineHeader = None,
    ) -> p.PrewarmResponse:
        """Embed texts ahead of need, at background priority (any valid key may; a key held
        to some namespaces is not told how many were cached already)."""
        ctx = self._context("cache.prewarm", caller, None, Priority.BACKGROUND.name, x_deadline_ms)
        return await self.service.prewarm(req, ctx)

    # ---------------------------------------------------------------- operations
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when every downstream answered within 2 s; 503 naming the ones that did not.
        Public, so one check (at most HEALTH_MAX_AGE_S old) answers every concurrent probe."""
        down = await self.health.get()
        status = {"status": "ok" if not down else "unavailable", "unavailable": down}
        return JSONResponse(status, status_code=503 if down else 200)

    async def _unavailable_downstreams(self) -> list[str]:
        stats = await self.downstreams.stats(timeout_s=2.0)
        return sorted(name for name, s in stats.items() if "error" in s)

    def coalesced(self) -> dict[str, Any]:
        """What the Router merged: handle and actor calls saved."""
        out = self.downstreams.coalesced()
        if self.cache is not None:
            out |= self.cache.coalesced()
        return out

    @app.get("/v1/stats")
    async def stats(self, caller: Caller) -> dict:
        _check_sees_everything(caller)
        return await self._stats()

    @app.get("/metrics")
    async def metrics(self, caller: Caller) -> Response:
        _check_sees_everything(caller)
        return PlainTextResponse(to_prometheus(await self._stats()))

    async def _stats(self) -> dict:
        router = {
            "latency": self.latency.summary(),
            "coalesced": self.coalesced(),
            "joined_misses_computed": self.cache.joined_misses_computed if self.cache else 0,
            **identity(),
        }
        out = {"router": router, **(await self.downstreams.stats())}
        out["cache"] = await self.cache.stats() if self.cache is not None else None
        out["scheduler"] = {key: s.stats() for key, s in self.schedulers.items()}
        return out
