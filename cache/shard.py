"""One cache shard: L1 (W-TinyLFU in memory), L2 (Redis), namespace versions, single flight.

Pure asyncio; `cache.client` runs it as a named Ray actor. Reads go L1 -> L2 (promoting L2
hits) -> miss; a miss is either *owned* by the caller (compute, then `store` or `release`)
or *pending* (someone else is computing it: `await_keys`). Lookups never wait on others, so
two requests that each own what the other waits for cannot deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cache.backends import CircuitOpen, MemoryBackend, RedisBackend
from cache.keys import KeyRequest, Kind, versioned
from cache.policy import TinyLfuCache
from mneme.config import CacheConfig

logger = logging.getLogger(__name__)
MAX_PENDING_L2_WRITES = 1000


@dataclass
class Lookup:
    keys: list[str]  # the full key of each request, in order
    found: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # key -> (value, tier)
    owned: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    # the class of each pending key's owner: a more urgent asker waits for it only
    # `cache.hedge_after_ms`, then computes it too
    owners: dict[str, int] = field(default_factory=dict)
    # the number of this lookup's claims: `release` with it drops them, and not a claim
    # another caller took after one of these lapsed (None: an older shard's lookup)
    claim: int | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """From a shard actor of an older release (detached actors outlive a deploy of new
        code): the fields it did not have take their defaults."""
        self.__dict__.update(Lookup([]).__dict__ | state)


@dataclass
class Claim:
    """A miss being computed: its value once stored (None: released), since when, its
    owner's class, and the number of the lookup that claimed it."""

    done: asyncio.Future
    started: float
    priority: int
    number: int


@dataclass
class KindStats:
    hits_l1: int = 0
    hits_l2: int = 0
    misses: int = 0
    joined: int = 0  # misses that waited for another caller's computation
    outranked: int = 0  # joined misses whose owner was less urgent than the joiner

    def as_dict(self) -> dict[str, float]:
        total = self.hits_l1 + self.hits_l2 + self.misses
        return {
            "hits_l1": self.hits_l1,
            "hits_l2": self.hits_l2,
            "misses": self.misses,
            "joined": self.joined,
            "outranked": self.outranked,
            "requests": total,
            "hit_rate": (self.hits_l1 + self.hits_l2) / total if total else 0.0,
            "hit_rate_l1": self.hits_l1 / total if total else 0.0,
        }


# The CacheConfig fields a shard actor reads (the rest are the Router's, applied at once).
ACTOR_SETTINGS = (
    "shards",  # not read by a shard: the count every Router adopts (CacheClient.connect)
    "max_entries",
    "max_bytes",
    "hot_after_hits",
    "hot_ttl_factor",
    "redis_url",
    "l2_timeout_s",
    "l2_breaker_failures",
    "l2_breaker_cooldown_s",
    "ttl_s",
    "single_flight_wait_s",
    "semantic_max_per_namespace",
    "semantic_max_answers",
)


class CacheShard:
    """See the module docstring. All methods are coroutine-safe on one event loop."""

    def __init__(
        self, config: CacheConfig, shard: int = 0, timer: Callable[[], float] = time.monotonic
    ):
        self.config = config
        self.shard = shard
        self.timer = timer
        self.l1 = MemoryBackend(
            TinyLfuCache(
                config.max_entries,
                config.max_bytes,
                hot_after_hits=config.hot_after_hits,
                hot_ttl_factor=config.hot_ttl_factor,
                timer=timer,
            )
        )
        self.l2 = (
            RedisBackend(config.redis_url, timeout_s=config.l2_timeout_s)
            if (config.redis_url)
            else None
        )
        if self.l2 is not None:
            self.l2.breaker.failure_threshold = config.l2_breaker_failures
            self.l2.breaker.cooldown_s = config.l2_breaker_cooldown_s
        # A fresh epoch per start: versions from before a restart can never match again.
        self.epoch = uuid.uuid4().hex[:8]
        self._versions: dict[str, int] = defaultdict(int)
        self._inflight: dict[str, Claim] = {}
        # numbers each lookup's claims; from a random start, so a release sent before the
        # actor restarted cannot match a claim made after it
        self._lookups = int.from_bytes(os.urandom(6), "big")
        self._kinds: dict[Kind, KindStats] = defaultdict(KindStats)
        self._l2_errors = 0  # calls Redis failed (or was too slow for)
        self._l2_skipped = 0  # calls not made: the breaker was open
        self._l2_writes_dropped = 0
        self._l2_pending: set[asyncio.Task] = set()
        # (namespace, bucket) -> (version, query vectors, answers, when each was added),
        # newest last; a bucket is everything but the query that the answer depends on
        # (top_k, filter, max_tokens...), least recently used first; `_semantic_size` answers
        # in all, at most `semantic_max_answers` (callers choose the buckets)
        self._semantic: OrderedDict[
            tuple[str, str], tuple[str, list[np.ndarray], list[bytes], list[float]]
        ]
        self._semantic = OrderedDict()
        self._semantic_size = 0
        self._semantic_hits = 0
        self._semantic_misses = 0

    def settings(self) -> dict[str, Any]:
        """The settings this actor runs with: fixed when it started (it is detached and
        named, so a redeploy finds it running and keeps them)."""
        return {name: getattr(self.config, name) for name in ACTOR_SETTINGS}

    # ---------------------------------------------------------------- versions
    def version(self, namespace: str) -> str:
        return f"{self.epoch}.{self._versions[namespace]}"

    def bump(self, namespace: str) -> str:
        """A new version: results cached under the older ones are never served again (a
        semantic bucket of an older version is replaced by the next answer added to it,
        or dropped as least recently used)."""
        self._versions[namespace] += 1
        return self.version(namespace)

    def full_key(self, request: KeyRequest) -> str:
        if request.namespace is None:
            return request.base
        return versioned(request.base, self.version(request.namespace))

    # ------------------------------------------------------------------ reads
    async def lookup(self, requests: list[KeyRequest], claim: bool = True) -> Lookup:
        keys = [self.full_key(r) for r in requests]
        kinds = dict(zip(keys, (r.kind for r in requests), strict=True))
        self._lookups += 1
        number = self._lookups  # other lookups may run while this one awaits Redis
        result = Lookup(keys, claim=number)
        unique = list(dict.fromkeys(keys))
        for key, value in self.l1.get_many_now(unique).items():
            result.found[key] = (value, "hit-l1")
        missing = [k for k in unique if k not in result.found]
        if missing and self.l2 is not None:
            from_l2 = await self._l2_get(missing)
            for key, (value, left_s) in from_l2.items():
                result.found[key] = (value, "hit-l2")
                self.l1.set_many_now({key: value}, min(left_s, self._ttl(kinds[key])))
            missing = [k for k in missing if k not in from_l2]
            # while Redis answered, an owner may have stored some of these: look again
            for key, value in self.l1.get_many_now(missing).items():
                result.found[key] = (value, "hit-l1")
            missing = [k for k in missing if k not in result.found]
        occurrences = Counter(keys)  # a merged lookup asks for a key once per request
        for key in unique:
            if key in result.found:
                stats = self._kinds[kinds[key]]
                if result.found[key][1] == "hit-l1":
                    stats.hits_l1 += occurrences[key]
                else:
                    stats.hits_l2 += occurrences[key]
        classes: dict[str, list[int]] = defaultdict(list)  # of the requests asking for a key
        for key, request in zip(keys, requests, strict=True):
            classes[key].append(request.priority)
        now = self.timer()
        for key in missing:
            stats = self._kinds[kinds[key]]
            stats.misses += occurrences[key]
            if not claim:
                continue
            inflight = self._inflight.get(key)
            if inflight is not None and now - inflight.started < self.config.single_flight_wait_s:
                result.pending.append(key)
                result.owners[key] = inflight.priority
                stats.joined += occurrences[key]
                stats.outranked += sum(c < inflight.priority for c in classes[key])
            else:  # a lapsed claim's waiters wait on: whoever stores the key wakes them
                future = inflight.done if inflight is not None else None
                if future is None or future.done():
                    future = asyncio.get_running_loop().create_future()
                self._inflight[key] = Claim(future, now, min(classes[key]), number)
                result.owned.append(key)
                stats.joined += occurrences[key] - 1
        return result

    async def await_keys(
        self, keys: list[str], timeout_s: float, priority: int | None = None
    ) -> dict[str, bytes]:
        """Values of pending keys once their owners store them (missing: compute yourself).
        `priority`: the waiter's class; a key still being computed when the wait ends is
        then computed by the waiter too, so its claim takes the waiter's class if more
        urgent (later joiners of that class wait for the waiter instead of hedging too)."""
        claims = {k: self._inflight[k] for k in keys if k in self._inflight}
        found = self.l1.get_many_now([k for k in keys if k not in claims])
        if claims:
            futures = [asyncio.shield(c.done) for c in claims.values()]
            await asyncio.wait(futures, timeout=timeout_s)
            for key, claim in claims.items():
                if claim.done.done() and claim.done.result() is not None:
                    found[key] = claim.done.result()
                elif priority is not None and self._inflight.get(key) is claim:
                    claim.priority = min(claim.priority, priority)
                    claim.started = self.timer()
            # stored meanwhile under a claim that replaced the one waited on
            found |= self.l1.get_many_now([k for k in claims if k not in found])
        return found

    async def _l2_get(self, keys: list[str]) -> dict[str, tuple[bytes, float]]:
        """{key: (value, seconds left)}; the backend bounds the call (`l2_timeout_s` a round
        trip) and counts a slow Redis as failing."""
        try:
            return await self.l2.get_many_with_ttl(keys)
        except CircuitOpen:  # not a Redis error: none was asked
            self._l2_skipped += 1
            return {}
        except Exception as exc:  # L2 is an optimisation: a failure is a miss, counted
            self._l2_errors += 1
            logger.debug("L2 read failed: %r", exc)
            return {}

    # ----------------------------------------------------------------- writes
    def _ttl(self, kind: Kind) -> float:
        return getattr(self.config.ttl_s, Kind(kind).value)

    async def store(self, entries: list[tuple[str, Kind, bytes]]) -> None:
        """L1 now, L2 in the background; wakes every caller waiting on these keys."""
        by_ttl: dict[float, dict[str, bytes]] = defaultdict(dict)
        for key, kind, value in entries:
            ttl = self._ttl(kind)
            self.l1.set_many_now({key: value}, ttl)
            by_ttl[ttl][key] = value
            self._resolve(key, value)
        if self.l2 is not None:
            for ttl, items in by_ttl.items():
                self._write_behind(items, ttl)

    def release(self, keys: list[str], claim: int | None = None) -> None:
        """The owner failed to compute: waiters wake empty-handed and compute themselves.
        `claim`: the owner's `Lookup.claim`; a key claimed since by another lookup (the
        owner's claim lapsed after `single_flight_wait_s`) stays that caller's. None: any
        claim (a client of an older release)."""
        for key in keys:
            inflight = self._inflight.get(key)
            if claim is None or (inflight is not None and inflight.number == claim):
                self._resolve(key, None)

    def _resolve(self, key: str, value: bytes | None) -> None:
        inflight = self._inflight.pop(key, None)
        if inflight is not None and not inflight.done.done():
            inflight.done.set_result(value)

    def _write_behind(self, items: dict[str, bytes], ttl: float) -> None:
        if len(self._l2_pending) >= MAX_PENDING_L2_WRITES:
            self._l2_writes_dropped += 1
            return
        task = asyncio.get_running_loop().create_task(self._l2_set(items, ttl))
        self._l2_pending.add(task)
        task.add_done_callback(self._l2_pending.discard)

    async def _l2_set(self, items: dict[str, bytes], ttl: float) -> None:
        try:
            await self.l2.set_many(items, ttl)  # bounded by the backend, as reads are
        except CircuitOpen:
            self._l2_skipped += 1
        except Exception as exc:
            self._l2_errors += 1
            logger.debug("L2 write failed: %r", exc)

    async def flush(self) -> None:
        """Wait for background L2 writes (tests and shutdown)."""
        if self._l2_pending:
            await asyncio.gather(*list(self._l2_pending), return_exceptions=True)

    # ------------------------------------------------------- semantic answers
    def semantic_lookup(
        self, namespace: str, bucket: str, vector: np.ndarray, threshold: float
    ) -> tuple[str, bytes | None]:
        """(current version, the answer of the most similar cached query if >= threshold)."""
        version = self.version(namespace)
        entry = self._semantic.get((namespace, bucket))
        if entry is not None:
            self._semantic.move_to_end((namespace, bucket))
            self._expire_semantic(entry)
        if entry is not None and entry[0] == version and entry[1]:
            scores = np.stack(entry[1]) @ np.asarray(vector, dtype=np.float32)
            best = int(np.argmax(scores))
            if scores[best] >= threshold:
                self._semantic_hits += 1
                return version, entry[2][best]
        self._semantic_misses += 1
        return version, None

    def semantic_add(
        self, namespace: str, bucket: str, version: str, vector: np.ndarray, answer: bytes
    ) -> bool:
        """Register an answer computed at `version`; refused if the namespace moved on."""
        if version != self.version(namespace):
            return False
        key = (namespace, bucket)
        entry = self._semantic.get(key)
        if entry is None or entry[0] != version:
            self._drop_semantic(key)
            entry = self._semantic[key] = (version, [], [], [])
        self._semantic.move_to_end(key)
        entry[1].append(np.asarray(vector, dtype=np.float32))
        entry[2].append(answer)
        entry[3].append(self.timer())
        self._semantic_size += 1
        if len(entry[1]) > self.config.semantic_max_per_namespace:
            del entry[1][0], entry[2][0], entry[3][0]
            self._semantic_size -= 1
        while self._semantic_size > self.config.semantic_max_answers:
            self._drop_semantic(next(iter(self._semantic)))
        return True

    def _expire_semantic(self, entry: tuple[str, list, list, list]) -> None:
        """Drop the answers older than `ttl_s.answer` (oldest first, as they were added): a
        similar question is not served an answer the answer cache would have let expire."""
        oldest_kept = self.timer() - self.config.ttl_s.answer
        expired = sum(1 for added in entry[3] if added <= oldest_kept)
        if expired:
            del entry[1][:expired], entry[2][:expired], entry[3][:expired]
            self._semantic_size -= expired

    def _drop_semantic(self, key: tuple[str, str]) -> None:
        entry = self._semantic.pop(key, None)
        if entry is not None:
            self._semantic_size -= len(entry[1])

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        l1 = self.l1.cache
        lapsed_before = self.timer() - self.config.single_flight_wait_s
        return {
            "shard": self.shard,
            "kinds": {kind.value: s.as_dict() for kind, s in self._kinds.items()},
            "l1": {
                "entries": len(l1),
                "bytes": l1.bytes,
                "evictions": l1.evictions,
                "expirations": l1.expirations,
            },
            "l2": None
            if self.l2 is None
            else {
                "errors": self._l2_errors,
                "skipped_while_open": self._l2_skipped,
                "breaker": self.l2.breaker.state,
                "writes_dropped": self._l2_writes_dropped,
            },
            # claims being computed; one whose owner went away (a Router replica that died
            # between lookup and store) is dropped by the next lookup after it lapses
            "inflight": sum(claim.started > lapsed_before for claim in self._inflight.values()),
            "semantic": {"hits": self._semantic_hits, "misses": self._semantic_misses},
        }
