"""Code run in child processes (spawned) by the limits tests."""

from __future__ import annotations

import asyncio
import contextvars
from datetime import UTC, datetime

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import ConcurrencyLimitError, QuotaExceededError, RateLimitError

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)


async def _spend(url: str, session_id: str, tasks: int, calls: int, amount: float) -> float:
    accepted = 0.0
    async with ContextEngine(url, settings=SETTINGS) as engine:

        async def worker() -> None:
            nonlocal accepted
            for _ in range(calls):
                try:
                    await engine.track_usage(session_id, "spend", "tokens", amount)
                except QuotaExceededError:
                    continue
                accepted += amount

        await asyncio.gather(*(worker() for _ in range(tasks)))
    return accepted


def spend(url: str, session_id: str, tasks: int, calls: int, amount: float) -> float:
    """Track usage from ``tasks`` coroutines; the total amount this process got accepted."""
    return asyncio.run(_spend(url, session_id, tasks, calls, amount))


async def _hammer(url: str, session_id: str, tasks: int, calls: int) -> int:
    admitted = 0
    async with ContextEngine(url, settings=SETTINGS) as engine:

        async def worker() -> None:
            nonlocal admitted
            for _ in range(calls):
                try:
                    await engine.enforce_rate_limit(session_id, "search")
                except RateLimitError:
                    await asyncio.sleep(0.005)
                    continue
                admitted += 1

        await asyncio.gather(*(worker() for _ in range(tasks)))
    return admitted


def hammer(url: str, session_id: str, tasks: int, calls: int) -> int:
    """Call enforce_rate_limit repeatedly; how many calls this process got admitted."""
    return asyncio.run(_hammer(url, session_id, tasks, calls))


async def _occupy(url: str, session_id: str, tasks: int, rounds: int) -> list[tuple[float, float]]:
    intervals: list[tuple[float, float]] = []
    loop = asyncio.get_running_loop()
    async with ContextEngine(url, settings=SETTINGS) as engine:

        async def worker() -> None:
            for _ in range(rounds):
                try:
                    async with engine.concurrency_slot(session_id, "job"):
                        start = loop.time()
                        await asyncio.sleep(0.01)
                        intervals.append((start, loop.time()))
                except ConcurrencyLimitError:
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(worker() for _ in range(tasks)))
    return intervals


def occupy_intervals(
    url: str, session_id: str, tasks: int, rounds: int
) -> list[tuple[float, float]]:
    """Hold slots repeatedly; the (start, end) monotonic times of each slot held."""
    return asyncio.run(_occupy(url, session_id, tasks, rounds))


async def _hold_forever(url: str, session_id: str) -> None:
    settings = EngineSettings(auto_cleanup=False, auto_migrate=False, lease_ttl=1.0)
    async with ContextEngine(url, settings=settings) as engine:
        async with engine.concurrency_slot(session_id, "stuck"):
            print("held", flush=True)
            await asyncio.sleep(3600)


def hold_forever(url: str, session_id: str) -> None:
    """Take a slot and never give it back (the test kills this process)."""
    asyncio.run(_hold_forever(url, session_id))


def admitted_times(url: str, session_id: str, tasks: int, seconds: float) -> list[float]:
    """Call enforce_rate_limit for ``seconds``; the decision instants of admitted calls.

    The engine's clock is wrapped so each task remembers its last reading: for an
    admitted call that is the instant the decision was made, under the state's lock.
    """
    last_reading: contextvars.ContextVar[datetime] = contextvars.ContextVar("last")

    def clock() -> datetime:
        now = datetime.now(UTC)
        last_reading.set(now)
        return now

    async def main() -> list[float]:
        times: list[float] = []
        async with ContextEngine(url, settings=SETTINGS, clock=clock) as engine:
            stop = asyncio.get_running_loop().time() + seconds

            async def worker() -> None:
                while asyncio.get_running_loop().time() < stop:
                    try:
                        await engine.enforce_rate_limit(session_id, "burst")
                    except RateLimitError:
                        await asyncio.sleep(0.002)
                        continue
                    times.append(last_reading.get().timestamp())

            await asyncio.gather(*(worker() for _ in range(tasks)))
        return times

    return asyncio.run(main())
