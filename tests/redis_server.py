"""A real redis-server on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest
import redis

from tests.conftest import free_port


class RedisServer:
    """`start()`, `stop()` (SIGKILL: a crash, not a clean shutdown) and `url`."""

    def __init__(self, port: int | None = None, appendfsync: str | None = None):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="mneme-redis-")
        self.process: subprocess.Popen | None = None
        self.appendfsync = appendfsync  # None: no AOF (a cache); "always" / "everysec": AOF

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no" if self.appendfsync is None else "yes",
                *(["--appendfsync", self.appendfsync] if self.appendfsync else []),
                "--dir",
                self.dir,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
