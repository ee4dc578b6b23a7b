"""The Router's side of the cache: named shard actors, batch lookups, single flight.

`get_or_compute` looks every key of a request up at once (one actor call per shard
involved), computes only the misses this caller owns, stores them without waiting for L2,
then collects misses other callers were already computing. A cache that is slow or gone is
a miss, never an error: the request is computed instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import ray

from cache.keys import KeyRequest, bucket_of
from cache.shard import ACTOR_SETTINGS, CacheShard, Lookup
from mneme.coalesce import Coalescer, detached, fire_and_forget
from mneme.config import CacheConfig, RouterConfig
from mneme.priority import Priority

logger = logging.getLogger(__name__)
Compute = Callable[[list[int]], Awaitable[list[bytes]]]
MAX_REBUMP_DELAY_S = 30.0  # between background retries of a bump no shard confirmed


async def _awaited(ref: Any) -> Any:
    return await ref


def split_lookup(lookup: Lookup, sizes: list[int]) -> list[Lookup]:
    """One merged lookup back into each request's: a miss the shard gave the merged call is
    owned by the first request that asked for it; any later one waits for it (pending)."""
    owned, claimed, parts, start = set(lookup.owned), set(), [], 0
    for size in sizes:
        keys = lookup.keys[start : start + size]
        start += size
        part = Lookup(keys, lookup.found, owners=lookup.owners, claim=lookup.claim)
        for key in dict.fromkeys(keys):
            if key in lookup.found:
                continue
            if key in owned and key not in claimed:
                claimed.add(key)
                part.owned.append(key)
            else:
                part.pending.append(key)
        parts.append(part)
    return parts


def shard_actor_name(app_name: str, shard: int) -> str:
    return f"mneme-cache:{app_name}:{shard}"


def cache_actors(app_name: str) -> list[tuple[int, str, str]]:
    """(shard, name, namespace) of each running cache actor of `app_name` (in any Ray
    namespace), by shard."""
    prefix = shard_actor_name(app_name, 0).removesuffix("0")
    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name, index = actor["name"], actor["name"].removeprefix(prefix)
        if name.startswith(prefix) and index.isdigit():
            found.append((int(index), name, actor["namespace"]))
    return sorted(found)


def _shard_actor(config: CacheConfig, app_name: str, shard: int) -> Any:
    """The named shard actor, started with `config` unless it is running already. Detached
    and named: every Router replica (and a restarted one) finds the same shards."""
    return (
        ray.remote(CacheShard)
        .options(
            name=shard_actor_name(app_name, shard),
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=0,
            max_concurrency=10_000,
            # Every call would report its state changes to the GCS for Ray's task listing, as
            # Serve's own actors do not (RAY_SERVE_ENABLE_TASK_EVENTS). Measured here, an async
            # actor answering 2-key lookups from 8 callers: 900-940 against 980-1,080 us of CPU
            # per call over all Ray processes (3 alternations, /tmp script).
            enable_task_events=False,
        )
        .remote(config, shard)
    )


class CacheClient:
    """Handles to the cache shards of one application (created on first use, then shared)."""

    def __init__(
        self,
        config: CacheConfig,
        app_name: str = "mneme",
        router: RouterConfig | None = None,
        shards: int | None = None,
    ):
        """`shards`: how many shard actors the keys spread over (default `config.shards`);
        `connect` passes the running cache's count."""
        self.config = config
        router = router or RouterConfig()
        count = config.shards if shards is None else shards
        self.shards = [_shard_actor(config, app_name, i) for i in range(count)]
        self._background: set[asyncio.Future] = set()  # releases of claims nobody took up
        self._rebumping: set[str] = set()  # namespaces whose bump is retried in the background
        self.joined_misses_computed = 0  # after all: their owner slow (hedged), gone or failed
        self._last_shard_stats: dict[int, dict] = {}  # each shard's last answer to `stats`
        # Concurrent requests' lookups (and stores) to one shard go as one actor call.
        self._lookups: list[Coalescer] | None = None
        self._stores: list[Coalescer] | None = None
        if router.coalesce:
            self._lookups = [
                Coalescer(
                    lambda requests, i=i: self._claiming_lookup(i, requests),
                    split=split_lookup,
                    max_in_flight=router.coalesce_max_in_flight,
                    max_items=router.coalesce_max_items,
                    orphaned=lambda part, i=i: self._release(i, part.owned, part.claim),
                )
                for i in range(len(self.shards))
            ]
            self._stores = [
                Coalescer(
                    lambda entries, s=shard: self._call(s.store.remote(entries)),
                    split=lambda _, sizes: [None] * len(sizes),
                    max_in_flight=router.coalesce_max_in_flight,
                    max_items=router.coalesce_max_items,
                )
                for shard in self.shards
            ]

    @classmethod
    async def connect(
        cls, config: CacheConfig, app_name: str = "mneme", router: RouterConfig | None = None
    ) -> CacheClient:
        """A client of the application's cache as it runs: its keys spread over as many
        shards as the running actors have (the first shard's `shards` setting), whatever
        `config.shards` says. Routers of an old and a new config side by side (a rolling
        update) must map every namespace to the same shard, or a write would bump its
        version where the other Routers do not look, and they would go on serving the
        results cached before it."""
        shards = None
        try:
            running = await asyncio.wait_for(
                _awaited(_shard_actor(config, app_name, 0).settings.remote()), 30.0
            )
            shards = running.get("shards")  # absent: an actor older than the setting
        except Exception as exc:  # restarting, say
            logger.warning("cache shard 0 did not tell its shard count (%r)", exc)
        if shards is None:  # count the shards running (beyond the 0 just asked, if any)
            running_actors = await asyncio.to_thread(cache_actors, app_name)
            highest = max((shard for shard, _, _ in running_actors), default=0)
            shards = highest + 1 if highest > 0 else config.shards
        return cls(config, app_name, router, shards)

    async def stale_settings(self) -> dict[str, tuple[Any, Any]]:
        """Settings the running shard actors differ in from this config: {field: (running,
        configured)}. The actors are detached and named, so a redeploy that changes these
        finds them running and they keep theirs (logged as a warning at the Router's start;
        `python -m cache.reset` between `serve shutdown` and the deploy applies them)."""
        wanted = {name: getattr(self.config, name) for name in ACTOR_SETTINGS}
        stale: dict[str, tuple[Any, Any]] = {}
        for shard in self.shards:
            try:
                running = await self._call(shard.settings.remote(), 30.0)
            except Exception as exc:  # a shard starting or gone: nothing to compare
                logger.debug("cache shard settings unavailable: %r", exc)
                continue
            for name, value in running.items():
                if value != wanted[name]:
                    stale[name] = (value, wanted[name])
        return stale

    def _shard_of(self, request: KeyRequest) -> int:
        """Namespaced keys live with their namespace's version; the rest spread by key."""
        basis = request.namespace if request.namespace is not None else request.base
        return self._shard_of_text(basis)

    def _shard_of_text(self, basis: str) -> int:
        return bucket_of(basis, len(self.shards))

    async def _call(self, ref: Any, timeout_s: float | None = None) -> Any:
        return await asyncio.wait_for(_awaited(ref), timeout_s or self.config.actor_timeout_s)

    async def get_or_compute(
        self,
        requests: Sequence[KeyRequest],
        compute: Compute,
        tiers: list[str] | None = None,
        wait_s: float | None = None,
        priority: int = Priority.NORMAL,
    ) -> list[bytes]:
        """Values for `requests`, in order; `compute(indices)` is called for owned misses,
        and for joined ones whose owner has not delivered within `wait_s` (the request's
        time left) or `single_flight_wait_s`, whichever is shorter. `priority`: the
        request's class; a miss that a less urgent request owns is waited for at most
        `hedge_after_ms` (that request may be queued behind more urgent work)."""
        if priority != Priority.NORMAL:
            requests = [dataclasses.replace(r, priority=int(priority)) for r in requests]
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            by_shard[self._shard_of(request)].append(i)
        values: list[bytes | None] = [None] * len(requests)
        labels = ["miss"] * len(requests)
        owned: list[tuple[int, str, int]] = []  # (shard, key, index)
        claims: dict[int, int | None] = {}  # shard -> the number of its lookup's claims
        # (shard, owner less urgent) -> key -> index: misses others compute
        pending: dict[tuple[int, bool], dict[str, int]] = defaultdict(dict)
        duplicates: list[tuple[int, int]] = []  # (index, index of the same key's first use)
        to_compute: list[int] = []
        tasks = [
            asyncio.ensure_future(self._lookup(s, [requests[i] for i in idx], priority))
            for s, idx in by_shard.items()
        ]
        try:
            lookups = await asyncio.gather(*tasks)
        except BaseException:  # cancelled: what the finished lookups claimed is nobody's
            for shard, task in zip(by_shard, tasks, strict=True):
                if task.done() and not task.cancelled() and task.exception() is None:
                    if (lookup := task.result()) is not None:
                        self._release(shard, lookup.owned, lookup.claim)
            raise
        for (shard, indices), lookup in zip(by_shard.items(), lookups, strict=True):
            if lookup is None:  # cache unreachable: compute everything of this shard
                to_compute += indices
                continue
            claims[shard] = lookup.claim
            first_of: dict[str, int] = {}
            pending_keys = set(lookup.pending)
            for i, key in zip(indices, lookup.keys, strict=True):
                if key in lookup.found:
                    values[i], labels[i] = lookup.found[key]
                elif key in first_of:  # the same key twice in one request: get it once
                    duplicates.append((i, first_of[key]))
                elif key in pending_keys:  # its owner may be less urgent: wait less for it
                    late = lookup.owners.get(key, priority) > priority
                    first_of[key] = pending[shard, late][key] = i
                else:  # owned: a claimed lookup leaves every other miss to this caller
                    first_of[key] = i
                    owned.append((shard, key, i))
                    to_compute.append(i)
        own = asyncio.ensure_future(
            self._compute_into(requests, compute, to_compute, owned, claims, values)
        )
        try:
            await asyncio.gather(  # its own misses, and meanwhile the others' (timed from now)
                own,
                *(
                    self._collect(shard, keys, requests, compute, values, priority, wait_s, late)
                    for (shard, late), keys in pending.items()
                ),
            )
        except BaseException:
            if own.cancelled():  # perhaps before its first step, so its own release never ran
                self._release_uncomputed(owned, claims, values)
            raise
        for i, first in duplicates:
            values[i], labels[i] = values[first], labels[first]
        if tiers is not None:
            tiers.extend(labels)
        return values  # type: ignore[return-value]

    async def _lookup(
        self, shard: int, requests: list[KeyRequest], priority: int = Priority.NORMAL
    ) -> Lookup | None:
        try:
            if self._lookups is not None:  # the most urgent first, and first to own a miss
                return await self._merged_lookup(shard, requests, priority)
            return await self._claiming_lookup(shard, requests)
        except Exception as exc:
            logger.warning("cache shard %d lookup failed (%r): computing instead", shard, exc)
            return None

    async def _merged_lookup(self, shard: int, requests: list[KeyRequest], priority: int) -> Lookup:
        """This request's part of a merged lookup. A caller cancelled while the merged call
        ran gives its part back through the coalescer (`orphaned`); one cancelled after its
        part was handed over, before it could resume, gives it back here."""
        part = self._lookups[shard].submit(requests, priority)
        try:
            return await part
        except asyncio.CancelledError:
            if part.done() and not part.cancelled() and part.exception() is None:
                self._release(shard, part.result().owned, part.result().claim)
            raise

    async def _claiming_lookup(self, shard: int, requests: list[KeyRequest]) -> Lookup:
        """One lookup call. If its answer never reaches the caller (a timeout, a cancelled
        request), the misses it claimed are released once it arrives: otherwise whoever
        joined them would wait `single_flight_wait_s` for an owner that is gone."""
        ref = self.shards[shard].lookup.remote(requests)
        try:
            return await self._call(ref)
        except BaseException:
            detached(self._release_when_answered(shard, ref), self._background)
            raise

    async def _release_when_answered(self, shard: int, ref: Any) -> None:
        try:
            lookup = await self._call(ref, self.config.single_flight_wait_s)
        except Exception:  # no answer: its claims lapse after single_flight_wait_s
            return
        self._release(shard, lookup.owned, lookup.claim)

    def _release(self, shard: int, keys: list[str], claim: int | None) -> None:
        """Gives up `keys` claimed by lookup number `claim` (`Lookup.claim`): their waiters
        compute them. A key claimed since by someone else is left to them."""
        if not keys:
            return
        if claim is None:  # a shard actor of an older release: its `release` takes keys only
            self.shards[shard].release.remote(keys)
        else:
            self.shards[shard].release.remote(keys, claim)

    def _release_uncomputed(self, owned, claims, values) -> None:
        """Gives up the owned misses not computed: nobody else would compute them."""
        given_back: dict[int, list[str]] = defaultdict(list)
        for shard, key, i in owned:
            if values[i] is None:
                given_back[shard].append(key)
        for shard, keys in given_back.items():  # one call per shard
            self._release(shard, keys, claims[shard])

    async def _compute_into(self, requests, compute, indices, owned, claims, values) -> None:
        if not indices:
            return
        try:
            computed = await compute(indices)
        except BaseException:
            self._release_uncomputed(owned, claims, values)
            raise
        for i, value in zip(indices, computed, strict=True):
            values[i] = value
        per_shard: dict[int, list[tuple[str, Any, bytes]]] = defaultdict(list)
        for shard, key, i in owned:
            per_shard[shard].append((key, requests[i].kind, values[i]))
        for shard, entries in per_shard.items():
            self._store(shard, entries)

    def _store(self, shard: int, entries: list[tuple[str, Any, bytes]]) -> None:
        """Fire and forget: never blocks a reply. Wakes whoever waits on these keys."""
        if self._stores is not None:
            fire_and_forget(self._stores[shard].submit(entries))
        else:
            self.shards[shard].store.remote(entries)

    async def _collect(
        self,
        shard: int,
        keys: dict[str, int],
        requests: Sequence[KeyRequest],
        compute: Compute,
        values,
        priority: int,
        deadline_s: float | None,
        late: bool,
    ) -> None:
        """Values other callers are computing; compute here at `priority` (and store, waking
        whoever else waits) what they fail to deliver within `single_flight_wait_s`, or
        `hedge_after_ms` when the owner is less urgent (`late`), or the request's time left
        (`deadline_s`), whichever is shortest."""
        wait_s = self.config.hedge_after_ms / 1000 if late else self.config.single_flight_wait_s
        wait_s = min(wait_s, self.config.single_flight_wait_s)
        # The shard hands the owner's claim to a waiter whose wait ends (`priority` given),
        # so that later joiners wait for it; not to one whose own deadline ended it: it
        # could not compute in time, and the claim of an owner that is gone would be kept.
        takes_over = deadline_s is None or deadline_s >= wait_s
        wait_s = wait_s if deadline_s is None else max(0.0, min(wait_s, deadline_s))
        known: dict[str, bytes] = {}
        try:
            ref = self.shards[shard].await_keys.remote(
                list(keys), wait_s, priority if takes_over else None
            )
            known = await self._call(ref, wait_s + 1.0)
        except Exception as exc:
            logger.warning("waiting for joined misses failed (%r): computing", exc)
        missing = [key for key in keys if key not in known]
        if missing:  # the owner failed, or is slow (queued behind more urgent work?)
            self.joined_misses_computed += len(missing)
            computed = await compute([keys[key] for key in missing])
            known.update(zip(missing, computed, strict=True))
            self._store(shard, [(k, requests[keys[k]].kind, known[k]) for k in missing])
        for key, i in keys.items():
            values[i] = known[key]

    async def bump(self, namespace: str) -> bool:
        """Make every cached search/answer of `namespace` unreachable (after a write); False
        when no shard confirmed it (slow or restarting for 3 x `bump_timeout_s`). The bump is
        then retried in the background until the shard confirms it: the write stands, and
        until then its namespace's older results could be served."""
        for attempt in range(3):  # a bump sent twice only moves the version twice
            try:
                await self._bump_once(namespace)
                return True
            except Exception as exc:
                logger.warning("cache bump of %r failed (attempt %d): %r", namespace, attempt, exc)
        logger.error(
            "namespace %r version not bumped: its cached results may be stale until a retry "
            "in the background gets through",
            namespace,
        )
        if namespace not in self._rebumping:
            self._rebumping.add(namespace)
            detached(self._bump_until_confirmed(namespace), self._background)
        return False

    async def _bump_once(self, namespace: str) -> None:
        ref = self.shards[self._shard_of_text(namespace)].bump.remote(namespace)
        await self._call(ref, self.config.bump_timeout_s)

    async def _bump_until_confirmed(self, namespace: str) -> None:
        delay = self.config.bump_timeout_s
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._bump_once(namespace)
                except Exception:
                    delay = min(delay * 2, MAX_REBUMP_DELAY_S)
                    continue
                logger.warning(
                    "namespace %r version bumped after all (in the background)", namespace
                )
                return
        finally:
            self._rebumping.discard(namespace)

    async def semantic_lookup(
        self, namespace: str, bucket: str, vector: Any, threshold: float
    ) -> tuple[str | None, bytes | None]:
        """(version to register under, a similar query's cached answer or None)."""
        shard = self.shards[self._shard_of_text(namespace)]
        try:
            ref = shard.semantic_lookup.remote(namespace, bucket, vector, threshold)
            return await self._call(ref)
        except Exception as exc:
            logger.warning("semantic lookup failed (%r): computing", exc)
            return None, None

    def semantic_add(
        self, namespace: str, bucket: str, version: str, vector: Any, answer: bytes
    ) -> None:
        shard = self.shards[self._shard_of_text(namespace)]
        shard.semantic_add.remote(namespace, bucket, version, vector, answer)  # fire and forget

    def coalesced(self) -> dict[str, Any]:
        """Merged lookups and stores, summed over shards."""
        out = {}
        for name, group in (("cache_lookup", self._lookups), ("cache_store", self._stores)):
            if group:
                stats = [c.stats() for c in group]
                total = {k: sum(s[k] for s in stats) for k in ("calls", "submissions", "items")}
                total["submissions_per_call"] = total["submissions"] / max(total["calls"], 1)
                out[name] = total
        return out

    async def stats(self) -> dict[str, Any]:
        """Every shard's figures and their sum. A shard that does not answer in time is
        summed as it last answered, so the sums (counters) do not drop while it is slow."""
        answers = await asyncio.gather(
            *(self._call(s.stats.remote()) for s in self.shards), return_exceptions=True
        )
        answered = {i: a for i, a in enumerate(answers) if isinstance(a, dict)}
        self._last_shard_stats |= answered
        out = aggregate(list(self._last_shard_stats.values()), len(self.shards))
        out["shards_answering"] = len(answered)
        out["by_shard"] = {str(i): figures for i, figures in answered.items()}
        return out


def aggregate(shards: list[dict], expected: int) -> dict[str, Any]:
    kinds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    l1: dict[str, float] = defaultdict(float)
    l2: dict[str, Any] = {}
    semantic = {"hits": 0, "misses": 0}
    for shard in shards:
        for name in semantic:
            semantic[name] += shard["semantic"][name]
        for kind, figures in shard["kinds"].items():
            for name in ("hits_l1", "hits_l2", "misses", "joined", "outranked", "requests"):
                kinds[kind][name] += figures.get(name, 0)  # absent from older actors
        for name, value in shard["l1"].items():
            l1[name] += value
        if shard["l2"] is not None:
            l2["errors"] = l2.get("errors", 0) + shard["l2"]["errors"]
            skipped = shard["l2"].get("skipped_while_open", 0)  # absent from older actors
            l2["skipped_while_open"] = l2.get("skipped_while_open", 0) + skipped
            l2["writes_dropped"] = l2.get("writes_dropped", 0) + shard["l2"]["writes_dropped"]
            l2.setdefault("breaker", []).append(shard["l2"]["breaker"])
    for figures in kinds.values():
        total = figures["requests"]
        figures["hit_rate"] = (figures["hits_l1"] + figures["hits_l2"]) / total if total else 0.0
        figures["hit_rate_l1"] = figures["hits_l1"] / total if total else 0.0
    return {
        "shards": expected,
        "kinds": {k: dict(v) for k, v in kinds.items()},
        "l1": dict(l1),
        "l2": l2 or None,
        "semantic_answers": semantic,
    }
