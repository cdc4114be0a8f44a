"""How long a migration takes on a large store: sessions stored at ``--from``, then the
upgrade to head timed, on PostgreSQL and SQLite.

    python -m benchmarks.migration --sessions 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import tempfile
import time
import uuid

import asyncpg

from ctxengine import ContextEngine, EngineSettings

SETTINGS = EngineSettings(auto_cleanup=False)
PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
#: The columns of a session stored at 0006_idle_bucket.
COLUMNS = (
    "tenant_id, session_id, user_id, tier, status, metadata, tags, preferences, created_at, "
    "last_activity, request_count, error_count, total_processing_time, current_chat_id, "
    "chat_count"
)


async def postgres(sessions: int, start: str) -> float:
    admin = await asyncpg.connect(PG_SERVER)
    name = f"ctx_bench_migration_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    server = PG_SERVER.rsplit("/", 1)[0]
    try:
        await ContextEngine(f"{server}/{name}", settings=SETTINGS).migrate(start)
        conn = await asyncpg.connect(f"{server}/{name}")
        await conn.execute(
            f"INSERT INTO ctx_sessions ({COLUMNS}) SELECT 'default', 's' || i, "
            "'u' || (i % 1000), 'free', 'active', '{}', '[]', '{}', now(), "
            "now() - (i % 3600) * interval '1 second', 0, 0, 0, 'default', 1 "
            f"FROM generate_series(1, {sessions}) AS i"
        )
        await conn.execute("VACUUM ANALYZE ctx_sessions")
        await conn.close()
        started = time.perf_counter()
        await ContextEngine(f"{server}/{name}", settings=SETTINGS).migrate()
        return time.perf_counter() - started
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def sqlite(sessions: int, start: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "migration.db")
        url = f"sqlite:///{path}"
        await ContextEngine(url, settings=SETTINGS).migrate(start)
        db = sqlite3.connect(path)
        db.execute(
            f"WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < "
            f"{sessions}) INSERT INTO ctx_sessions ({COLUMNS}) SELECT 'default', 's' || i, "
            "'u' || (i % 1000), 'free', 'active', '{}', '[]', '{}', "
            "'2026-12-03 00:00:00.000000', strftime('%Y-%m-%d %H:%M:%f000', '2026-12-03', "
            "'-' || (i % 3600) || ' seconds'), 0, 0, 0, 'default', 1 FROM g"
        )
        db.commit()
        db.close()
        started = time.perf_counter()
        await ContextEngine(url, settings=SETTINGS).migrate()
        return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.migration")
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--from", dest="start", default="0006_idle_bucket")
    parser.add_argument("--backend", choices=("all", "sqlite", "postgres"), default="all")
    args = parser.parse_args()
    runs = {"sqlite": sqlite, "postgres": postgres}
    for name, run in runs.items():
        if args.backend in ("all", name):
            seconds = await run(args.sessions, args.start)
            print(f"{name}: {args.start} -> head on {args.sessions:,} sessions: {seconds:.1f} s")


if __name__ == "__main__":
    asyncio.run(main())
