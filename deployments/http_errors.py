"""HTTP edge of the error hierarchy: every error leaves the ingress in OpenAI's JSON shape."""

from __future__ import annotations

import logging
import math
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from mneme.errors import InvalidRequest, MnemeError, PayloadTooLarge

logger = logging.getLogger("ray.serve")


def error_response(exc: MnemeError) -> JSONResponse:
    headers = dict(exc.headers)
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)


def _param(loc: tuple) -> str | None:
    """('body', 'items', 0, 'text') -> 'items[0].text'; pydantic's union tags are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "str" or "[" in str(part):  # a union member's tag, not a field
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> MnemeError:
    errors = list(exc.errors())
    # a union reports one error per member; the deepest location is the most specific one
    first = max(errors, key=lambda e: len(e.get("loc", ())), default={})
    if first.get("type") == "json_invalid":
        return InvalidRequest("request body is not valid JSON", code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid request")
    if first.get("type") == "missing" and param is None:
        message = "a JSON request body is required"
    elif first.get("type") == "missing":
        message = f"{param} is required"
    elif param:
        message = f"{param}: {message}"
    return InvalidRequest(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MnemeError)
    async def _mneme(_: Request, exc: MnemeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = MnemeError(str(exc.detail))
        err.status_code = exc.status_code
        err.error_type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the ingress")
        return error_response(MnemeError(f"internal error: {type(exc).__name__}"))


class BodySizeLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413 before parsing them.

    A declared Content-Length over the limit is refused without reading a byte; a chunked body
    is counted as it arrives and cut off at the limit.
    """

    # Set by the Router at start-up: Serve runs a pickled copy of the FastAPI app, so the limit
    # lives on this (importable, hence shared) class rather than on the app's state.
    max_bytes = 4 * 1024 * 1024

    def __init__(self, app: ASGIApp, where: str = "ingress"):
        self.app = app
        self.where = where

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit, self.where, send)
            return
        received = 0
        refused = False

        async def counted() -> dict:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not refused:
                    refused = True
                    await _too_large(limit, self.where, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:  # the 413 is already out; drop what the app answers after it
                await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not refused:  # the app's complaint about the cut-off body is expected
                raise


async def _too_large(limit: int, where: str, send: Send) -> None:
    message = f"request body exceeds {limit} bytes (refused at the {where})"
    response = error_response(PayloadTooLarge(message, param="body"))
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def proxy_middlewares() -> list:
    """For `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`: the body limit at Serve's HTTP proxy.

    Installed there, an oversized body is refused by the proxy and never reaches a replica. The
    limit comes from `MNEME_MAX_REQUEST_BODY_BYTES` (the proxy does not see the app's args).
    """
    from starlette.middleware import Middleware

    limit = os.environ.get("MNEME_MAX_REQUEST_BODY_BYTES")
    if limit:
        BodySizeLimit.max_bytes = int(limit)
    return [Middleware(BodySizeLimit, where="proxy")]
