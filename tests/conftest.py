"""Shared test helpers: free loopback ports, and offline model settings for every test."""

from __future__ import annotations

import os

import pytest

from benchmarks.serving import free_port  # noqa: F401  (one helper; tests import it from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture()
def redis_server():
    """A Redis for the cache (no AOF)."""
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture()
def log_redis():
    """A Redis fit for the memory log (AOF; the log refuses one without)."""
    from tests.redis_server import RedisServer

    server = RedisServer(appendfsync="everysec").start()
    try:
        yield server
    finally:
        server.cleanup()
