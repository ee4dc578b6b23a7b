"""Request priority classes and deadlines, as the ingress reads them from a request."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from mneme.errors import InvalidRequest


class Priority(enum.IntEnum):
    """Lower runs earlier, as in vLLM's priority scheduling."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3
    BACKGROUND = 4

    @classmethod
    def parse(cls, value: str | None, *, param: str = "priority") -> Priority:
        if value is None or value == "":
            return cls.NORMAL
        try:
            return cls[value.strip().upper()]
        except KeyError:
            names = ", ".join(p.name.lower() for p in cls)
            raise InvalidRequest(
                f"unknown priority {value!r}; expected one of: {names}", param=param
            ) from None


COMPUTED = "computed"


@dataclass(frozen=True)
class RequestContext:
    """What every downstream call carries: the request's class and its absolute deadline."""

    priority: Priority = Priority.NORMAL
    deadline: float | None = None  # time.monotonic() seconds
    received_at: float = field(default_factory=time.monotonic)
    # tiers of the request's cache lookups, filled on the way ("hit-l1", "hit-l2", "miss"),
    # and COMPUTED for a model call no lookup stood for (a generation that is not cached)
    cache_tiers: list[str] = field(default_factory=list)
    # seconds spent queued in the Router before each downstream call (X-Queue-Wait-Ms)
    queue_waits: list[float] = field(default_factory=list)
    # False for an API key held to some namespaces: whether a text is in the shared embedding
    # cache would tell it what other namespaces stored or asked (X-Cache, prewarm counts)
    reveal_cache: bool = True

    def cache_header(self) -> str | None:
        """X-Cache, for a request that looked the cache up: miss if anything was computed,
        else the slowest tier that answered (hit-semantic: an answer cached for a similar
        question)."""
        if all(tier == COMPUTED for tier in self.cache_tiers):
            return None
        if "hit-semantic" in self.cache_tiers:
            return "hit-semantic"
        if COMPUTED in self.cache_tiers:
            return "miss"
        for tier in ("miss", "hit-l2", "hit-l1"):
            if tier in self.cache_tiers:
                return tier
        return None

    def remaining_s(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - time.monotonic()


def parse_deadline_ms(value: str | None, arrived: float | None = None) -> float | None:
    """`X-Deadline-Ms` is relative to arrival (`arrived`, time.monotonic(); default now);
    returns an absolute monotonic deadline."""
    if value is None or value == "":
        return None
    try:
        ms = float(value)
    except ValueError:
        raise InvalidRequest(
            "X-Deadline-Ms must be a number of milliseconds", param="X-Deadline-Ms"
        ) from None
    if not (0 < ms <= 3_600_000):
        raise InvalidRequest("X-Deadline-Ms must be in (0, 3600000]", param="X-Deadline-Ms")
    return (time.monotonic() if arrived is None else arrived) + ms / 1000.0
