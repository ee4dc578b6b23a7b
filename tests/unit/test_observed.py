"""The ingress middleware: when a request arrived, for its deadline and its latency."""

import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from deployments.observed import ObservedRequests, arrival
from mneme.priority import parse_deadline_ms


async def slow_to_parse(request: Request) -> JSONResponse:
    await request.body()
    time.sleep(0.05)  # as a large body's JSON parsing and validation would
    return JSONResponse({"arrived": arrival(), "handled": time.monotonic()})


def test_a_request_is_timed_from_its_arrival_not_from_when_its_body_was_parsed():
    app = Starlette(routes=[Route("/", slow_to_parse, methods=["POST"])])
    app.add_middleware(ObservedRequests)
    with TestClient(app) as client:
        sent = time.monotonic()
        times = client.post("/", content=b"x" * 1000).json()
    assert sent <= times["arrived"] <= times["handled"] - 0.05
    # X-Deadline-Ms counts from there
    assert parse_deadline_ms("200", times["arrived"]) == times["arrived"] + 0.2
