"""ONE contract test suite, run against every cache backend (L1 memory and L2 Redis)."""

import asyncio
import contextlib
import time

import pytest

from cache.backends import CircuitBreaker, CircuitOpen, MemoryBackend, RedisBackend
from cache.policy import TinyLfuCache


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_backend(request):
    """A factory: a Redis client belongs to the event loop it is made in."""
    if request.param == "memory":
        return lambda: MemoryBackend(TinyLfuCache(1000))
    server = request.getfixturevalue("redis_server")
    return lambda: RedisBackend(server.url, timeout_s=0.5)


def run(coro):
    return asyncio.run(coro)


def test_get_many_returns_only_present_keys(make_backend):
    async def go():
        backend = make_backend()
        await backend.set_many({"a": b"1", "b": b"2"}, ttl_s=60)
        return await backend.get_many(["a", "b", "c"])

    assert run(go()) == {"a": b"1", "b": b"2"}


def test_set_replaces(make_backend):
    async def go():
        backend = make_backend()
        await backend.set_many({"k": b"old"}, ttl_s=60)
        await backend.set_many({"k": b"new"}, ttl_s=60)
        return await backend.get_many(["k"])

    assert run(go()) == {"k": b"new"}


def test_delete_many(make_backend):
    async def go():
        backend = make_backend()
        await backend.set_many({"a": b"1", "b": b"2"}, ttl_s=60)
        await backend.delete_many(["a"])
        return await backend.get_many(["a", "b"])

    assert run(go()) == {"b": b"2"}


def test_ttl_expires(make_backend):
    async def go():
        backend = make_backend()
        await backend.set_many({"short": b"x"}, ttl_s=0.2)
        before = await backend.get_many(["short"])
        await asyncio.sleep(0.4)
        return before, await backend.get_many(["short"])

    assert run(go()) == ({"short": b"x"}, {})


def test_empty_and_binary_values(make_backend):
    payload = bytes(range(256)) * 10

    async def go():
        backend = make_backend()
        await backend.set_many({"bin": payload}, ttl_s=60)
        return await backend.get_many([]), await backend.get_many(["bin"])

    assert run(go()) == ({}, {"bin": payload})


def test_breaker_opens_after_failures_and_half_opens():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5, timer=lambda: now[0])
    breaker.failure()
    assert breaker.allow()
    breaker.failure()
    assert not breaker.allow() and breaker.state == "open"
    now[0] = 5.0
    assert breaker.allow() and breaker.state == "half-open"
    breaker.success()
    assert breaker.state == "closed"


@pytest.mark.redis
def test_a_half_open_breaker_lets_one_call_probe_at_a_time():
    """While Redis is down each call waits out its timeout: after the cooldown one call
    finds out whether it is back, not every concurrent one."""
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5, timer=lambda: now[0])
    breaker.failure()
    now[0] = 6
    assert breaker.allow() and not breaker.allow()  # the probe, then nobody else
    breaker.failure()  # Redis still down: open for another cooldown
    assert not breaker.allow() and breaker.state == "open"
    now[0] = 12
    assert breaker.allow() and not breaker.allow()
    now[0] = 18  # that probe never reported (its request was cancelled): another goes
    assert breaker.allow()
    breaker.success()
    assert breaker.allow() and breaker.allow() and breaker.state == "closed"


def test_redis_down_raises_fast_then_the_breaker_stops_calls(redis_server):
    backend = RedisBackend(redis_server.url, timeout_s=0.05)
    redis_server.stop()

    async def go():
        errors = 0
        for _ in range(3):
            try:
                await backend.get_many(["k"])
            except Exception:
                errors += 1
        with pytest.raises(CircuitOpen):
            await backend.get_many(["k"])
        await backend.close()
        return errors

    assert run(go()) == 3


class SlowLink:
    """A TCP relay in front of a real Redis that holds every reply `delay_s`: a Redis slow
    to answer, a fault a healthy local one will not produce on demand."""

    def __init__(self, upstream_port: int, delay_s: float):
        self.upstream_port, self.delay_s = upstream_port, delay_s
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, client_reader, client_writer) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(source, sink, delay_s: float) -> None:
            try:
                while data := await source.read(65536):
                    await asyncio.sleep(delay_s)
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(client_reader, writer, 0.0), pipe(reader, client_writer, 0.04))

    def close(self) -> None:
        self.server.close()


@pytest.mark.redis
def test_a_redis_slow_to_answer_opens_the_breaker_instead_of_holding_every_call(redis_server):
    """Each reply 40 ms late, within the 50 ms read timeout: but a call that must reconnect
    first needs several round trips. Cancelled from outside it would count as nothing (the
    breaker never opened, and every call waited out the caller's bound); the backend's own
    deadline counts it as a failure, so the breaker opens and calls stop waiting."""

    async def go():
        link = SlowLink(redis_server.port, delay_s=0.04)
        port = await link.start()
        backend = RedisBackend(f"redis://127.0.0.1:{port}/0", timeout_s=0.05)
        took = []
        for _ in range(6):
            started = time.perf_counter()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(backend.get_many_with_ttl(["k"]), 0.2)  # the shard's
            took.append(time.perf_counter() - started)
        state = backend.breaker.state
        await backend.close()
        link.close()
        return state, took

    state, took = run(go())
    assert state == "open" and max(took[-2:]) < 0.02, took
