"""Scheduling budgets that follow the graph: replicas x (max_ongoing_requests - 1) / Routers.

Refreshed in the background, so when Serve scales a downstream up or down the Router lets
more or fewer requests through to it.
"""

from __future__ import annotations

import asyncio
import logging

from deployments.downstreams import DEPLOYMENT_NAMES, Downstreams
from mneme.config import SchedulerConfig
from mneme.scheduler import PriorityScheduler

logger = logging.getLogger("ray.serve")
ROUTER = "Router"
# Kept free on every downstream replica for the Router's control calls (stats, health), so
# /healthz and /v1/stats answer while the budget is fully used by requests.
CONTROL_SLOTS = 1
STARTUP_REFRESH_S = 0.5  # refresh period while some downstream's budget is still unknown


def budget(per_replica: int, replicas: int, routers: int) -> int:
    return max(1, replicas * max(1, per_replica - CONTROL_SLOTS) // max(1, routers))


def make_schedulers(config: SchedulerConfig) -> dict[str, PriorityScheduler]:
    """Until the first refresh, budgets are the deployments' declared max_ongoing_requests."""
    from deployments.embedder import Embedder
    from deployments.generator import Generator
    from deployments.vector_search import VectorSearch

    declared = {"embedder": Embedder, "vector_search": VectorSearch, "generator": Generator}
    return {
        key: PriorityScheduler(
            DEPLOYMENT_NAMES[key],
            config.capacity.get(key, budget(declared[key].max_ongoing_requests, 1, 1)),
            max_queued_per_class=config.max_queued_per_class,
            starvation_threshold_s=config.starvation_threshold_ms / 1000.0,
            boost_interval_s=config.boost_interval_ms / 1000.0,
            max_queue_wait_s=None
            if config.max_queue_wait_ms is None
            else config.max_queue_wait_ms / 1000.0,
            fifo=config.policy == "fifo",
            reserved_share=config.reserved_share,
            preempt=config.preempt,
        )
        for key in DEPLOYMENT_NAMES
    }


async def running_replicas(app_name: str) -> dict[str, int]:
    """RUNNING replicas per deployment of `app_name`, read from the Serve controller's details
    as the plain dict it sends. `serve.status()` builds pydantic models from that dict (each
    deployment's request-router class cloudpickled again): about 140 ms of this replica's
    CPU per call, measured, holding the GIL while requests wait on the event loop."""
    from ray.serve.context import _get_global_client

    client = await asyncio.to_thread(_get_global_client)  # connects once, then cached
    details = await client._controller.get_serve_instance_details.remote()
    app = (details.get("applications") or {}).get(app_name) or {}
    return {
        name: sum(replica["state"] == "RUNNING" for replica in deployment.get("replicas") or ())
        for name, deployment in (app.get("deployments") or {}).items()
    }


async def refresh_once(
    config: SchedulerConfig,
    schedulers: dict[str, PriorityScheduler],
    downstreams: Downstreams,
    app_name: str,
) -> dict[str, int]:
    stats = await downstreams.stats(timeout_s=2.0)
    replicas = await running_replicas(app_name)
    routers = max(1, replicas.get(ROUTER, 1))
    downstreams.follow_replicas(replicas, routers)
    budgets = {}
    for key, scheduler in schedulers.items():
        if key in config.capacity:
            continue
        per_replica = stats.get(key, {}).get("max_ongoing_requests")
        running = replicas.get(DEPLOYMENT_NAMES[key], 0)
        if per_replica and running:
            budgets[key] = budget(int(per_replica), running, routers)
            scheduler.set_capacity(budgets[key])
    return budgets


class BudgetRefresher:
    """Re-derives every budget each `capacity_refresh_s`, for the replica's lifetime."""

    def __init__(
        self,
        config: SchedulerConfig,
        schedulers: dict[str, PriorityScheduler],
        downstreams: Downstreams,
        app_name: str,
    ):
        self.config = config
        self.schedulers = schedulers
        self.downstreams = downstreams
        self.app_name = app_name
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        derived: set[str] = set()  # downstreams whose budget came from their replicas
        unknown = {key for key in self.schedulers if key not in self.config.capacity}
        while True:
            try:
                budgets = await refresh_once(
                    self.config, self.schedulers, self.downstreams, self.app_name
                )
                derived |= set(budgets)
            except Exception as exc:  # keep the last budgets; try again next period
                logger.warning("scheduler budget refresh failed: %r", exc)
            # until every budget is known (downstreams still starting), the declared
            # defaults stand in: look again soon, so a burst at start-up is not over-admitted
            settled = derived >= unknown
            period = self.config.capacity_refresh_s
            await asyncio.sleep(period if settled else min(period, STARTUP_REFRESH_S))
