"""Every API request's latency (by route, class and status) and the headers that say how it
was served, recorded where every response passes: an ASGI middleware, so that errors,
streams and every route count, not only the answers an endpoint returned itself."""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mneme.priority import RequestContext
from mneme.stats import LatencyBook


@dataclass
class _Observed:
    route: str | None = None
    ctx: RequestContext | None = None
    arrived: float = field(default_factory=time.monotonic)  # before its body was read


_current: ContextVar[_Observed | None] = ContextVar("mneme_observed_request", default=None)


def observe(route: str, ctx: RequestContext) -> None:
    """Called by an endpoint once its request's class is known: from here on the request is
    recorded under `route`, whatever its outcome."""
    observed = _current.get()
    if observed is not None:
        observed.route, observed.ctx = route, ctx


def arrival() -> float:
    """When the current request reached the Router, before its body was read and parsed
    (time.monotonic(); now, outside a request): what its deadline and latency count from."""
    observed = _current.get()
    return time.monotonic() if observed is None else observed.arrived


def status_class(status: int | None) -> str:
    """2xx, 4xx, 5xx; `gone` for a client that left before any response began."""
    return "gone" if status is None else f"{status // 100}xx"


class ObservedRequests:
    """ASGI middleware. `X-Queue-Wait-Ms`: the time the request waited in the Router's
    queues, on every response of a request that queued (errors and streams too); `X-Cache`:
    where a 2xx answer came from, for callers that may see the shared caches."""

    latency = LatencyBook()  # the Router's, set when it starts (one Router per process)

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        observed = _Observed()
        token = _current.set(observed)
        status: int | None = None

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and observed.ctx is not None:
                status = message["status"]
                _add_headers(MutableHeaders(scope=message), observed.ctx, status)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            status = status or 500  # the outermost handler answers it
            raise
        finally:
            _current.reset(token)
            if observed.ctx is not None:
                labels = (observed.route, observed.ctx.priority.name.lower(), status_class(status))
                self.latency.observe(labels, time.monotonic() - observed.ctx.received_at)


def _add_headers(headers: MutableHeaders, ctx: RequestContext, status: int) -> None:
    if ctx.queue_waits:
        headers["X-Queue-Wait-Ms"] = f"{sum(ctx.queue_waits) * 1000.0:.1f}"
    if status < 300 and ctx.reveal_cache and (tier := ctx.cache_header()) is not None:
        headers["X-Cache"] = tier
