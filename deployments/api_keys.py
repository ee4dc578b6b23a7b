"""The HTTP edge of API keys: 401 before a body is read; the principal handed to the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from deployments.http_errors import error_response
from mneme.auth import KeyRing, Principal
from mneme.config import AuthConfig
from mneme.errors import Unauthorized

SCOPE_KEY = "mneme.principal"


def route_path(scope: Scope) -> str:
    """The path inside the application: without `root_path` (the Serve route prefix)."""
    return get_route_path(scope) or "/"


class ApiKeyGate:
    """ASGI middleware: a request without a valid key (where keys are configured) is answered
    401 before its body is read or validated, so it can neither change nor probe anything."""

    # Set by the Router at start-up (Serve runs a pickled copy of the app; see BodySizeLimit).
    keyring = KeyRing(AuthConfig())

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keyring = self.keyring
        if scope["type"] != "http" or not keyring.enabled or keyring.is_public(route_path(scope)):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            scope[SCOPE_KEY] = keyring.authenticate(authorization)
        except Unauthorized as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# Declares the scheme in the OpenAPI schema; the gate has already checked the key.
_bearer = HTTPBearer(auto_error=False, description="An API key from the config's auth.keys.")


async def _principal(  # async: FastAPI would run a sync dependency in its thread pool
    request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal | None:
    return request.scope.get(SCOPE_KEY)


Caller = Annotated[Principal | None, Depends(_principal)]
