"""Guarantees under concurrency: tasks in one process and several OS processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine.errors import SessionLimitError, SessionNotActiveError

from . import _workers


def pool(processes: int = 4):  # type: ignore[no-untyped-def]
    return multiprocessing.get_context("spawn").Pool(processes)


async def test_200_concurrent_updates_in_one_process(engine: ContextEngine) -> None:
    await engine.create_session("hot", "u")
    await asyncio.gather(
        *(
            engine.update_session("hot", increment_requests=True, add_processing_time=0.001)
            for _ in range(200)
        )
    )
    session = await engine.get_session("hot")
    assert session is not None
    assert session.request_count == 200
    assert session.total_processing_time == pytest.approx(0.2, abs=1e-6)


async def test_updates_from_four_processes_are_exact(engine: ContextEngine, db_url: str) -> None:
    await engine.create_session("hot", "u")
    with pool() as workers:
        workers.starmap(_workers.update, [(db_url, "hot", 5, 50, 0.002)] * 4)
    async with engine._store.engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT request_count, error_count, total_processing_time "
                    "FROM ctx_sessions WHERE session_id = 'hot'"
                )
            )
        ).one()
    assert row[0] == 4 * 5 * 50
    assert row[1] == 4 * 5 * 5
    assert row[2] == pytest.approx(1000 * 0.002, abs=1e-6)


async def test_sweepers_in_four_processes_expire_each_session_once(db_url: str) -> None:
    """Concurrent sweeps count what they expired themselves (on PostgreSQL in the
    database, when nobody listens): the counts add up to the sessions expired."""
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    settings = EngineSettings(auto_cleanup=False)
    async with ContextEngine(db_url, settings=settings, clock=lambda: long_ago) as engine:
        for start in range(0, 1200, 100):
            await asyncio.gather(
                *(engine.create_session(f"s{i}", "u") for i in range(start, start + 100))
            )
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("live", "u")
        with pool() as workers:
            start_at = time.time() + 3  # all four open, then sweep at once
            counts = workers.starmap(_workers.sweep, [(db_url, 10, start_at)] * 4)
        assert sum(counts) == 1200
        async with engine._store.engine.connect() as conn:
            grouped = text("SELECT status, count(*) FROM ctx_sessions GROUP BY status")
            by_status = {row[0]: row[1] for row in await conn.execute(grouped)}
        assert by_status == {"expired": 1200, "active": 1}


async def test_end_racing_with_updates_is_final(engine: ContextEngine, db_url: str) -> None:
    await engine.create_session("race", "u")
    with pool(3) as workers:
        pending = workers.starmap_async(_workers.update_until_ended, [(db_url, "race", 150)] * 3)
        await asyncio.sleep(0.3)
        ended = await engine.end_session("race", "completed")
        results = await asyncio.to_thread(pending.get, 120)
    accepted = sum(a for a, _ in results)
    refused = sum(r for _, r in results)
    assert accepted + refused == 450 and refused > 0
    final = await engine.get_session("race")
    assert final is not None and final.status is SessionStatus.COMPLETED
    assert final.ended_at == ended.ended_at
    assert final.request_count == accepted  # no update landed after the end
    with pytest.raises(SessionNotActiveError):
        await engine.update_session("race", increment_requests=True)


@pytest.mark.parametrize(("per_user", "total"), [(7, None), (None, 7)])
async def test_session_limits_hold_across_processes(
    engine: ContextEngine, db_url: str, per_user: int | None, total: int | None
) -> None:
    with pool() as workers:
        created = workers.starmap(_workers.create_many, [(db_url, "busy", 6, per_user, total)] * 4)
    assert sum(created) == 7
    assert await engine.count_sessions(user_id="busy") == 7
    settings = EngineSettings(
        auto_cleanup=False, max_sessions_per_user=per_user, max_active_sessions=total
    )
    async with ContextEngine(db_url, settings=settings) as limited:
        with pytest.raises(SessionLimitError):
            await limited.create_session(user_id="busy")


async def test_get_or_create_is_safe_across_processes(engine: ContextEngine, db_url: str) -> None:
    with pool() as workers:
        distinct = workers.starmap(_workers.get_or_create, [(db_url, "shared", 10)] * 4)
    assert distinct == [1, 1, 1, 1]
    assert await engine.count_sessions() == 1


async def test_cancelled_calls_leave_no_transaction_open(db_url: str) -> None:
    """Calls cancelled at every point of their transaction roll it back: afterwards no
    connection holds a transaction (on SQLite, the write lock) and every call works."""
    # one connection above the two the engine holds, for the check's own below
    settings = EngineSettings(auto_cleanup=False, pool_size=2, max_overflow=1)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await engine.set_rate_limit("s", "op", 10**6, 60)
        cancelled = 0
        for steps in range(1, 16):  # cancel after 1, 2, … turns of the event loop
            call = asyncio.ensure_future(engine.enforce_rate_limit("s", "op"))
            for _ in range(steps):
                await asyncio.sleep(0)
            cancelled += call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                pass
        assert cancelled  # some were cancelled mid-way
        store = engine._store
        for _ in range(100):  # connections closed in the background are back soon
            if store.connections_in_use() == 0:
                break
            await asyncio.sleep(0.01)
        assert store.connections_in_use() == 0
        if db_url.startswith("sqlite"):  # another writer gets the lock at once
            other = sqlite3.connect(db_url.split("///", 1)[1], timeout=0, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            other.close()
        else:
            async with engine._store.engine.connect() as conn:
                stuck = await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND state LIKE 'idle in transaction%'"
                    )
                )
                assert stuck.scalar_one() == 0
        await asyncio.gather(*(engine.enforce_rate_limit("s", "op") for _ in range(8)))
