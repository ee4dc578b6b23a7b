"""The body-size middleware on a bare Starlette app: 413 before the app reads the body."""

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from deployments.http_errors import BodySizeLimit

reached: list[int] = []


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    reached.append(len(body))
    return JSONResponse({"n": len(body)})


def client(max_bytes: int) -> TestClient:
    BodySizeLimit.max_bytes = max_bytes
    app = Starlette(
        routes=[Route("/", echo, methods=["POST"])],
        middleware=[Middleware(BodySizeLimit, where="proxy")],
    )
    return TestClient(app)


def test_declared_length_over_the_limit_is_refused_unread():
    reached.clear()
    r = client(1024).post("/", content=b"x" * 2048)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert reached == []


def test_chunked_body_is_cut_at_the_limit():
    reached.clear()

    def chunks():
        for _ in range(8):
            yield b"x" * 512

    r = client(1024).post("/", content=chunks())
    assert r.status_code == 413
    assert reached in ([], [0])  # the app never got the oversized body


def test_under_the_limit_passes():
    reached.clear()
    r = client(1024).post("/", content=b"x" * 100)
    assert r.status_code == 200 and r.json() == {"n": 100}
