"""The Router's calls to its downstreams: what a scheduled generation tells vLLM."""

from __future__ import annotations

import asyncio

from deployments.downstreams import Downstreams
from mneme.priority import Priority, RequestContext
from mneme.records import Generation, GenerationRequest
from mneme.scheduler import PriorityScheduler
from tests.clock import Clock


class FakeGeneratorHandle:
    """Stands in for the Generator's Serve handle (no Ray here): records what it is sent."""

    def __init__(self) -> None:
        self.sent: list[GenerationRequest] = []
        self.generate = self

    def remote(self, request: GenerationRequest) -> asyncio.Future:
        self.sent.append(request)
        done = asyncio.get_running_loop().create_future()
        done.set_result(Generation("text", "length", 1, 1))
        return done


def test_vllm_is_given_the_class_a_request_aged_to_not_the_one_it_asked_for():
    """vLLM orders its own queue by priority too: a background request the Router aged up
    after waiting must not sort behind every newer normal one there."""

    async def scenario():
        clock = Clock(100.0)
        scheduler = PriorityScheduler(
            "generator", 1, starvation_threshold_s=5.0, boost_interval_s=1.0, timer=clock
        )
        handle = FakeGeneratorHandle()
        downstreams = Downstreams(None, None, handle, {"generator": scheduler})
        held = await scheduler.acquire(RequestContext(Priority.NORMAL))
        request = GenerationRequest("r", [("user", "hi")], 4, priority=int(Priority.BACKGROUND))
        waiting = asyncio.ensure_future(
            downstreams.generate(request, RequestContext(Priority.BACKGROUND))
        )
        await asyncio.sleep(0)
        clock.now += 7.0  # starving since 5 s: low, normal, high
        scheduler.release(held)
        await waiting
        assert handle.sent[0].priority == int(Priority.HIGH)

    asyncio.run(scenario())
