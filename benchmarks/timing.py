"""Shared by the harnesses: sequential calls after a warm-up, latency summaries, the raw
driver's pool."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

#: One call of an operation, given its index.
Op = Callable[[int], Awaitable[Any]]
#: Calls per second and the latency summary of one operation.
Stats = dict[str, float]


def summary(latencies: list[float]) -> dict[str, float]:
    """Count, p50, p99 and max of ``latencies`` (seconds), in milliseconds."""
    ordered = sorted(latencies)
    n = len(ordered)
    return {
        "n": n,
        "p50_ms": ordered[n // 2] * 1000,
        "p99_ms": ordered[min(n - 1, int(n * 0.99))] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


async def timed(op: Op, n: int) -> dict[str, float]:
    """``n`` sequential calls of ``op`` after a warm-up: ops/s and the latency summary."""
    for i in range(min(50, n)):  # warm-up: caches, pools, prepared statements
        await op(i)
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {"ops_per_s": n / total, **summary(latencies)}


#: Runs side ``which`` (0: ctxengine, 1: the baseline) for the calls numbered
#: ``calls``, adding each call's latency to ``latencies``.
Block = Callable[[int, range, list[float]], Awaitable[None]]


async def interleaved(block: Block, per_round: int, rounds: int) -> tuple[Stats, Stats]:
    """Both sides in ``rounds`` blocks of ``per_round`` calls each, which of the two goes
    first alternating: both meet the same machine, whose speed drifts within a run.
    Each side's ops/s (over its own blocks) and latency summary."""
    latencies: tuple[list[float], list[float]] = ([], [])
    spent = [0.0, 0.0]
    for r in range(rounds):
        calls = range(r * per_round, (r + 1) * per_round)
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            start = time.perf_counter()
            await block(which, calls, latencies[which])
            spent[which] += time.perf_counter() - start
    ours, theirs = (
        {"ops_per_s": len(lat) / took, **summary(lat)}
        for lat, took in zip(latencies, spent, strict=True)
    )
    return ours, theirs


async def timed_pair(op: Op, base: Op, n: int, rounds: int = 10) -> tuple[Stats, Stats]:
    """``n`` sequential calls each of ``op`` and ``base`` after a warm-up of both,
    :func:`interleaved` in ``rounds`` blocks."""
    for i in range(min(50, n)):
        await op(i)
        await base(i)

    async def block(which: int, calls: range, latencies: list[float]) -> None:
        call = (op, base)[which]
        for i in calls:
            t = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t)

    return await interleaved(block, max(1, n // rounds), rounds)


async def raw_pool(dsn: str, size: int) -> asyncpg.Pool:
    """An asyncpg pool of ``size`` connections for the raw baselines, without asyncpg's
    reset query on release (one more round trip per call): the driver's statement and
    nothing else."""
    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=_keep)


async def _keep(connection: asyncpg.Connection) -> None:
    """Send nothing: the baselines change no session state."""
