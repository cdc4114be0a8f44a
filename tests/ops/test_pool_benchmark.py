"""benchmarks/pool.py runs end to end at a tiny size (timings are never asserted)."""

from __future__ import annotations

import asyncpg

from benchmarks import pool
from ctxengine import EngineSettings


async def test_the_pool_benchmark_measures_both_calls(pg_admin: asyncpg.Connection) -> None:
    settings = EngineSettings(auto_cleanup=False, pool_size=2)
    for op in pool.OPERATIONS:
        rows, placement = await pool.run(
            settings, [1, 4], n=16, repeats=1, rounds=1, op=op, place=False
        )
        assert placement
        assert [(r["tasks"], r["connections"]) for r in rows] == [(1, 1), (4, 2)]
        for row in rows:
            assert row["ops_per_s"] > 0 and row["raw_ops_per_s"] > 0
            assert row["opened"] == 0  # no overflow: nothing opened once warm
