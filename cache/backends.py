"""Cache backends behind one small contract: batch get, batch set with a TTL, delete.

`MemoryBackend` (L1, in the cache actor's memory, W-TinyLFU) and `RedisBackend` (L2) behave
the same; one contract test suite runs against both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from cache.policy import TinyLfuCache


class CacheBackend(Protocol):
    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]: ...

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None: ...


class MemoryBackend:
    """L1: a bounded W-TinyLFU cache of bytes values (size = len(value) + key overhead)."""

    KEY_OVERHEAD_BYTES = 100

    def __init__(self, cache: TinyLfuCache):
        self.cache = cache

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self.get_many_now(keys)

    def get_many_now(self, keys: Sequence[str]) -> dict[str, bytes]:
        found = {}
        for key in keys:
            value = self.cache.get(key)
            if value is not None:
                found[key] = value
        return found

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        self.set_many_now(items, ttl_s)

    def set_many_now(self, items: dict[str, bytes], ttl_s: float) -> None:
        for key, value in items.items():
            self.cache.set(key, value, ttl_s, size=len(value) + self.KEY_OVERHEAD_BYTES)

    async def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.cache.delete(key)


class CircuitOpen(Exception):
    """Raised instead of calling Redis while the breaker is open."""


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `cooldown_s` lets one call
    through (half-open) and closes if it succeeds, opens again if it fails. A probe that
    reports neither within `cooldown_s` (cancelled) is replaced by the next call."""

    def __init__(
        self,
        failure_threshold: int = 3,
        cooldown_s: float = 2.0,
        timer: Callable[[], float] = time.monotonic,
    ):
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.timer = timer
        self.failures = 0
        self.opened_at: float | None = None
        self.probe_at: float | None = None  # the half-open breaker's one call in flight

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        now = self.timer()
        if now - self.opened_at < self.cooldown_s:
            return False
        if self.probe_at is not None and now - self.probe_at < self.cooldown_s:
            return False  # another call is finding out whether Redis is back
        self.probe_at = now
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = self.probe_at = None

    def failure(self) -> None:
        self.failures += 1
        self.probe_at = None
        if self.failures >= self.failure_threshold:
            self.opened_at = self.timer()

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.timer() - self.opened_at >= self.cooldown_s else "open"


class RedisBackend:
    """L2: Redis with short timeouts behind a circuit breaker; errors raise to the caller."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.05,
        key_prefix: str = "mneme:",
        breaker: CircuitBreaker | None = None,
    ):
        import redis.asyncio as redis

        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.breaker = breaker or CircuitBreaker()
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=0,
            retry_on_timeout=False,
        )

    async def _guarded(self, operation, commands: int = 1):
        """`operation()` within `timeout_s` per round trip it needs (`commands`): each socket
        read has that timeout, but a call may need several (a reconnect's handshake first),
        and a Redis answering each just under it must count as failing, or the breaker
        would never open while every call took several timeouts."""
        if not self.breaker.allow():
            raise CircuitOpen("redis circuit open")
        try:
            result = await asyncio.wait_for(operation(), self.timeout_s * commands)
        except Exception:
            self.breaker.failure()
            raise
        self.breaker.success()
        return result

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        values = await self._guarded(lambda: self.client.mget([self.key_prefix + k for k in keys]))
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    async def get_many_with_ttl(self, keys: Sequence[str]) -> dict[str, tuple[bytes, float]]:
        """{key: (value, seconds it has left)} of the keys present, in one round trip: a
        value copied into L1 must expire there when it does here, not a TTL later."""
        if not keys:
            return {}

        async def read():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.mget([self.key_prefix + k for k in keys])
                for key in keys:
                    pipe.pttl(self.key_prefix + key)
                return await pipe.execute()

        # two round trips at most: a reconnect's handshake, then this
        values, *ttls_ms = await self._guarded(read, commands=2)
        return {
            k: (v, ttl_ms / 1000)
            for k, v, ttl_ms in zip(keys, values, ttls_ms, strict=True)
            if v is not None and ttl_ms > 0  # -2: gone since the MGET; -1: no TTL (not ours)
        }

    async def set_many(self, items: dict[str, bytes], ttl_s: float) -> None:
        if not items:
            return

        async def write():
            async with self.client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(self.key_prefix + key, value, px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

        await self._guarded(write, commands=4)  # as many SETs as entries, in one pipeline

    async def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            await self._guarded(lambda: self.client.delete(*[self.key_prefix + k for k in keys]))

    async def close(self) -> None:
        await self.client.aclose()
