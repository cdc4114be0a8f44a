"""PostgreSQL admits a call in one statement with ``ctx_rate_limit_take`` (migration
0005): the function must apply exactly the rule of :func:`ctxengine.ratelimit.decide`."""

from __future__ import annotations

import json
import random

import asyncpg

from ctxengine import ContextEngine, EngineSettings
from ctxengine.ratelimit import LimiterState, decide, in_us
from tests.fixtures import new_pg_database

WINDOWS = [0.5, 1.0, 7.3, 60.0, 86_400.0]
STARTS_US = [0, -5_000_000_123, 1_000_000_000_000_000, 1_700_000_000_123_456]
# how far time moves, as a fraction of the window: sub-window edges, a whole window,
# small steps, and a clock that went back a little (another process's)
STEPS = [0.0, 1 / 60, 59 / 60, 1.0, 61 / 60]


async def test_the_database_function_decides_as_the_python_rule(
    pg_admin: asyncpg.Connection,
) -> None:
    url = await new_pg_database(pg_admin)
    name = url.rsplit("/", 1)[1]
    await ContextEngine(url, settings=EngineSettings(auto_cleanup=False)).migrate()
    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    take = await conn.prepare("SELECT ctx_rate_limit_take($1::jsonb, $2, $3, $4, $5)::text")
    rnd = random.Random(20261123)
    admitted = refused = newer = 0
    try:
        for _ in range(80):
            window, max_calls = rnd.choice(WINDOWS), rnd.randint(1, 50)
            window_us = max(in_us(window), 1)
            state, now_us = LimiterState(), rnd.choice(STARTS_US)
            for _ in range(100):
                fraction = rnd.choice([*STEPS, rnd.random() * 0.6, -rnd.random() * 0.05])
                now_us += round(fraction * window_us)
                cost = rnd.randint(1, max_calls)
                stored = json.dumps(state.to_json()) if state.counts else None
                raw = await take.fetchval(stored, now_us, window_us, max_calls, cost)
                got = None if raw is None else json.loads(raw)
                decision = decide(state, now_us / 1_000_000, max_calls, window, cost)
                if state.counts and state.newest > (now_us * 60) // window_us:
                    # the state is newer than the call: the caller decides under the lock
                    assert got is None
                    newer += 1
                elif decision.allowed:
                    assert got == decision.state.to_json()
                    admitted += 1
                else:
                    assert got is None
                    refused += 1
                if decision.allowed:
                    state = decision.state
    finally:
        await conn.close()
        await pg_admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert min(admitted, refused, newer) > 100  # every branch was exercised
