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


async def timed_pair(op: Op, base: Op, n: int, rounds: int = 10) -> tuple[Stats, Stats]:
    """``n`` sequential calls each of ``op`` and ``base`` (after a warm-up of both),
    interleaved in ``rounds`` blocks of each, which of the two goes first alternating:
    both meet the same machine, whose speed drifts within a run. Each one's ops/s
    (over its own blocks) and latency summary."""
    for i in range(min(50, n)):
        await op(i)
        await base(i)
    per_round = max(1, n // rounds)
    latencies: tuple[list[float], list[float]] = ([], [])
    spent = [0.0, 0.0]
    for r in range(rounds):
        for which in (0, 1) if r % 2 == 0 else (1, 0):
            call = (op, base)[which]
            start = time.perf_counter()
            for i in range(r * per_round, (r + 1) * per_round):
                t = time.perf_counter()
                await call(i)
                latencies[which].append(time.perf_counter() - t)
            spent[which] += time.perf_counter() - start
    ours, theirs = (
        {"ops_per_s": len(lat) / took, **summary(lat)}
        for lat, took in zip(latencies, spent, strict=True)
    )
    return ours, theirs


async def raw_pool(dsn: str, size: int) -> asyncpg.Pool:
    """An asyncpg pool of ``size`` connections for the raw baselines, without asyncpg's
    reset query on release (one more round trip per call): the driver's statement and
    nothing else."""
    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=_keep)


async def _keep(connection: asyncpg.Connection) -> None:
    """Send nothing: the baselines change no session state."""
