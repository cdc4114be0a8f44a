"""update_session (or get_session) from 1, 16 and 64 tasks on a pool's settings, beside
the raw driver.

    python -m benchmarks.pool                      # the default settings
    python -m benchmarks.pool --pool-size 5 --max-overflow 10 --tasks 16
    python -m benchmarks.pool --op get_session     # a call that is never batched
    python -m benchmarks.pool --pgbouncer          # both sides through PgBouncer

Each task updates (reads) a session of its own. The raw driver runs the UPDATE of the
same row's columns (``bench_sessions``, made as ``ctx_sessions``), or the SELECT of the
session's row by its key, on as many connections as
the engine may open (``min(tasks, pool_size + max_overflow)``): each task holds one
when there are enough, else an asyncpg pool of that size hands them out per call (no
reset query on release). Both sides run interleaved in blocks after a warm-up; the
connections the engine's pool opened during the measured blocks are counted (through
the documented hook ``_store.engine``, docs/performance.md): a pool that closes
connections on return and opens new ones shows here. Medians of ``--repeats``.

``--pgbouncer`` starts Debian's PgBouncer as the tests do (tests/pgbouncer.py: transaction
mode, six server connections, from a checkout) and runs both sides through it: the
engine with ``transaction_pooling=True``, the raw driver without its statement cache
(``statement_cache_size=0``), as each must there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import asyncpg
from sqlalchemy import event

from benchmarks.placement import database_apart
from benchmarks.timing import Stats, _keep, interleaved, raw_pool
from ctxengine import ContextEngine, EngineSettings

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
KEY = "WHERE tenant_id = $1 AND session_id = $2"
#: get_session's read, as a user of the bare driver writes it
SELECT = f"SELECT * FROM ctx_sessions {KEY}"
OPERATIONS = ("update_session", "get_session")
#: update_session's change of a session row, as a user of the bare driver writes it
UPDATE = (
    "UPDATE bench_sessions SET request_count = request_count + 1,"
    " total_processing_time = total_processing_time + $3, last_activity = $4,"
    f" idle_deadline = $5 {KEY}"
)


def _args(sid: str) -> tuple[Any, ...]:
    now = datetime.now(UTC)
    return ("default", sid, 0.001, now, now.timestamp() + 1800)


async def concurrent_pair(
    ours: Callable[[int], Awaitable[Any]],
    theirs: Callable[[int], Awaitable[Any]],
    tasks: int,
    n: int,
    rounds: int,
) -> tuple[Stats, Stats]:
    """``n`` calls of each side spread over ``tasks`` tasks (task ``t`` calls
    ``side(t)``), interleaved in ``rounds`` blocks after a warm-up of both."""

    async def task(call: Callable[[int], Awaitable[Any]], t: int, k: int, out: list[float]) -> None:
        for _ in range(k):
            started = time.perf_counter()
            await call(t)
            out.append(time.perf_counter() - started)

    async def block(which: int, calls: range, latencies: list[float]) -> None:
        call = (ours, theirs)[which]
        await asyncio.gather(*(task(call, t, len(calls), latencies) for t in range(tasks)))

    for call in (ours, theirs):
        await asyncio.gather(*(task(call, t, 10, []) for t in range(tasks)))
    return await interleaved(block, max(1, n // tasks // rounds), rounds)


async def measure(
    url: str,
    settings: EngineSettings,
    tasks: int,
    n: int,
    rounds: int,
    op: str,
    through: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """One run at ``tasks`` tasks: both sides' ops/s and p99, and the connections the
    engine opened while measured."""
    width = min(tasks, settings.pool_size + settings.max_overflow)
    if through is not None:
        url = through(url)
        settings = settings.model_copy(update={"transaction_pooling": True})
    async with ContextEngine(url, settings=settings) as engine:
        sids = [
            (await engine.create_session(user_id=f"u{t}", tier="enterprise")).session_id
            for t in range(tasks)
        ]
        if through is None:
            raw = await raw_pool(url, width)
        else:  # through a pooler: no statement kept prepared
            raw = await asyncpg.create_pool(
                url, min_size=width, max_size=width, reset=_keep, statement_cache_size=0
            )
        try:
            await raw.execute("DROP TABLE IF EXISTS bench_sessions")
            await raw.execute("CREATE TABLE bench_sessions (LIKE ctx_sessions INCLUDING ALL)")
            columns = ", ".join(
                await raw.fetchval(
                    "SELECT array_agg(column_name::text) FROM information_schema.columns"
                    " WHERE table_name = 'ctx_sessions' AND is_generated = 'NEVER'"
                )
            )
            await raw.execute(
                f"INSERT INTO bench_sessions ({columns}) SELECT {columns} FROM ctx_sessions"
            )
            await raw.execute("VACUUM ANALYZE")
            held: list[asyncpg.Connection] = []
            if width == tasks:
                held = [await raw.acquire() for _ in range(tasks)]
            opened = [0]

            def _connected(*_: Any) -> None:
                opened[0] += 1

            pool_engine = engine._store.engine.sync_engine  # the documented hook
            event.listen(pool_engine, "connect", _connected)

            async def ours(t: int) -> None:
                if op == "get_session":
                    await engine.get_session(sids[t])
                else:
                    await engine.update_session(sids[t], increment_requests=True)

            async def theirs(t: int) -> None:
                conn = held[t] if held else raw
                if op == "get_session":
                    await conn.fetchrow(SELECT, "default", sids[t])
                else:
                    await conn.execute(UPDATE, *_args(sids[t]))

            # a first pass warms both sides up (the pool opens what it keeps); the
            # connections opened are counted over the measured pass only
            await concurrent_pair(ours, theirs, tasks, min(200 * tasks, n), 1)
            opened[0] = 0
            a, b = await concurrent_pair(ours, theirs, tasks, n, rounds)
            event.remove(pool_engine, "connect", _connected)
            for conn in held:
                await raw.release(conn)
        finally:
            await raw.close()
    return {
        "tasks": tasks,
        "connections": width,
        "ops_per_s": a["ops_per_s"],
        "p99_ms": a["p99_ms"],
        "raw_ops_per_s": b["ops_per_s"],
        "raw_p99_ms": b["p99_ms"],
        "ratio": a["ops_per_s"] / b["ops_per_s"],
        "opened": opened[0],
    }


async def run(
    settings: EngineSettings,
    tasks: list[int],
    n: int,
    repeats: int,
    rounds: int,
    op: str,
    place: bool = True,
    through: Callable[[str], str] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """The rows of ``tasks``; ``place``: the client and the server on CPUs of their own
    (benchmarks.placement), else where the scheduler puts them; ``through``: the URL of
    a database through a pooler."""
    admin = await asyncpg.connect(PG_SERVER)
    name = f"ctx_bench_pool_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_SERVER.rsplit("/", 1)[0] + f"/{name}"
    rows = []
    try:
        apart = database_apart(admin.get_server_pid()) if place else nullcontext("not pinned")
        with apart as placement:
            for t in tasks:
                reps = [
                    await measure(url, settings, t, n, rounds, op, through) for _ in range(repeats)
                ]
                row = dict(reps[0])
                for key in ("ops_per_s", "p99_ms", "raw_ops_per_s", "raw_p99_ms", "ratio"):
                    row[key] = statistics.median(r[key] for r in reps)
                row["opened"] = max(r["opened"] for r in reps)
                rows.append(row)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return rows, placement


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pool", description=__doc__)
    defaults = EngineSettings()
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size)
    parser.add_argument("--max-overflow", type=int, default=defaults.max_overflow)
    parser.add_argument("--op", choices=OPERATIONS, default="update_session")
    parser.add_argument(
        "--pgbouncer", action="store_true", help="both sides through PgBouncer (transaction mode)"
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--n", type=int, default=4000, help="calls per side and run")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved blocks per side")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = EngineSettings(
        auto_cleanup=False, pool_size=args.pool_size, max_overflow=args.max_overflow
    )
    with contextlib.ExitStack() as stack:
        through = None
        if args.pgbouncer:
            from tests.pgbouncer import running_pgbouncer  # a checkout's tests/

            through = stack.enter_context(running_pgbouncer()).url
        rows, placement = asyncio.run(
            run(settings, args.tasks, args.n, args.repeats, args.rounds, args.op, True, through)
        )
    print(
        f"{args.op}{' through PgBouncer' if args.pgbouncer else ''}, "
        f"pool_size={settings.pool_size} max_overflow={settings.max_overflow}, "
        f"{args.n} calls per side, median of {args.repeats} ({placement})"
    )
    print(
        f"{'tasks':>5}{'conns':>6}{'ops/s':>9}{'p99 ms':>8}{'raw ops/s':>11}"
        f"{'raw p99':>9}{'ratio':>7}{'opened':>8}"
    )
    for r in rows:
        print(
            f"{r['tasks']:>5}{r['connections']:>6}{r['ops_per_s']:>9.0f}{r['p99_ms']:>8.2f}"
            f"{r['raw_ops_per_s']:>11.0f}{r['raw_p99_ms']:>9.2f}{r['ratio']:>7.2f}"
            f"{r['opened']:>8}"
        )


if __name__ == "__main__":
    main()
