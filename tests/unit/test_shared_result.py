"""SharedResult: one check in flight for all callers, reused while young."""

from __future__ import annotations

import asyncio

from mneme.shared_result import SharedResult
from tests.clock import Clock


def test_concurrent_callers_share_one_check_and_a_young_result_is_reused():
    async def go():
        clock, calls = Clock(), []
        gate = asyncio.Event()

        async def check() -> int:
            calls.append(clock.now)
            await gate.wait()
            return len(calls)

        shared = SharedResult(check, max_age_s=1.0, clock=clock)
        waiting = [asyncio.ensure_future(shared.get()) for _ in range(50)]
        await asyncio.sleep(0)
        gate.set()
        first = await asyncio.gather(*waiting)
        clock.now = 0.9
        young = await shared.get()
        clock.now = 1.5
        fresh = await shared.get()
        return first, young, fresh, calls

    first, young, fresh, calls = asyncio.run(go())
    assert first == [1] * 50 and young == 1  # 51 answers, one check
    assert fresh == 2 and calls == [0.0, 1.5]  # older than max_age_s: checked again


def test_a_caller_that_goes_away_does_not_cancel_the_shared_check():
    async def go():
        gate = asyncio.Event()

        async def check() -> str:
            await gate.wait()
            return "ok"

        shared = SharedResult(check, max_age_s=1.0, clock=Clock())
        leaving = asyncio.ensure_future(shared.get())
        staying = asyncio.ensure_future(shared.get())
        await asyncio.sleep(0)
        leaving.cancel()
        gate.set()
        return await staying, shared.produced

    assert asyncio.run(go()) == ("ok", 1)


def test_a_failed_check_is_not_kept():
    async def go():
        outcomes = iter([RuntimeError("down"), "ok"])

        async def check() -> str:
            outcome = next(outcomes)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        shared = SharedResult(check, max_age_s=10.0, clock=Clock())
        try:
            await shared.get()
        except RuntimeError as exc:
            failed = str(exc)
        return failed, await shared.get()

    assert asyncio.run(go()) == ("down", "ok")
