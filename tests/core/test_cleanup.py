"""Expiry sweeps: set-based, exactly once across engines, a loop that survives failures."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings, Event, SessionStatus
from ctxengine.errors import SessionLimitError
from tests.fixtures import PG_SERVER, FakeClock, new_pg_database


def settings(**overrides: Any) -> EngineSettings:
    return EngineSettings(**{"auto_cleanup": False, "session_timeout": 60.0, **overrides})


async def test_cleanup_expires_idle_and_overdue_sessions(db_url: str, clock: FakeClock) -> None:
    async with ContextEngine(db_url, settings=settings(), clock=clock) as engine:
        events: list[Event] = []
        engine.subscribe(events.append, "session.expired", "cleanup.completed")
        await engine.create_session("idle", "u")
        await engine.create_session("paused", "u")
        await engine.pause_session("paused")
        await engine.create_session("deadline", "u", expires_at=clock.now + timedelta(seconds=5))
        await engine.create_session("done", "u")
        await engine.end_session("done")
        clock.advance(30)
        await engine.create_session("fresh", "u")
        assert await engine.cleanup_inactive_sessions() == 1  # only the deadline passed
        clock.advance(31)
        assert await engine.cleanup_inactive_sessions() == 2  # idle + paused
        assert await engine.cleanup_inactive_sessions(max_idle_seconds=10) == 1  # fresh
        assert await engine.cleanup_inactive_sessions() == 0
        statuses = {s.session_id: s.status for s in await engine.list_sessions()}
        assert statuses == {
            "idle": SessionStatus.EXPIRED,
            "paused": SessionStatus.EXPIRED,
            "deadline": SessionStatus.EXPIRED,
            "fresh": SessionStatus.EXPIRED,
            "done": SessionStatus.COMPLETED,
        }
        expired = [e.session_id for e in events if e.type == "session.expired"]
        assert sorted(expired) == ["deadline", "fresh", "idle", "paused"]
        done = [e.data["expired"] for e in events if e.type == "cleanup.completed"]
        assert done == [1, 2, 1, 0]


async def test_a_sweep_goes_on_across_batches_and_reasons(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog is swept by ``sweep_workers`` units of work at once on PostgreSQL (one
    on SQLite): every stale session is expired, and announced, exactly once."""
    monkeypatch.setattr("ctxengine.services.sessions._EXPIRE_BATCH", 3)
    async with ContextEngine(db_url, settings=settings(), clock=clock) as engine:
        events: list[Event] = []
        engine.subscribe(events.append, "session.expired", "cleanup.completed")
        running, most = 0, 0

        @contextmanager
        def sweeping(operation: str) -> Iterator[None]:
            nonlocal running, most
            running += operation == "cleanup_inactive_sessions"
            most = max(most, running)
            try:
                yield
            finally:
                running -= operation == "cleanup_inactive_sessions"

        engine._observe(sweeping)
        stale = []
        for i in range(4):  # idle, active and paused
            stale.append((await engine.create_session(f"idle-{i}", "u")).session_id)
            stale.append((await engine.create_session(f"asleep-{i}", "u")).session_id)
            await engine.pause_session(f"asleep-{i}")
        clock.advance(30)
        for i in range(3):  # past their deadline, active and paused
            deadline = clock.now + timedelta(seconds=1)
            stale.append(
                (await engine.create_session(f"due-{i}", "u", expires_at=deadline)).session_id
            )
            stale.append(
                (
                    await engine.create_session(f"due-asleep-{i}", "u", expires_at=deadline)
                ).session_id
            )
            await engine.pause_session(f"due-asleep-{i}")
        await engine.create_session("fresh", "u")
        clock.advance(31)
        await engine.touch("fresh")
        assert await engine.cleanup_inactive_sessions() == len(stale) == 14
        statuses = {s.session_id: s.status for s in await engine.list_sessions()}
        assert statuses.pop("fresh") is SessionStatus.ACTIVE
        assert set(statuses) == set(stale)
        assert set(statuses.values()) == {SessionStatus.EXPIRED}
        expired = Counter(e.session_id for e in events if e.type == "session.expired")
        assert expired == Counter(stale)
        assert [e.data["expired"] for e in events if e.type == "cleanup.completed"] == [14]
        assert most == (2 if db_url.startswith("postgresql") else 1)  # the sweep's workers


async def test_sessions_sharing_an_idle_bucket_expire_by_their_own_idleness(
    db_url: str, clock: FakeClock
) -> None:
    """The sweep and the live-session count find sessions through 10-second idle
    buckets (an index that touches do not change), yet go by ``last_activity`` itself:
    of two sessions in one bucket, only the one idle past the timeout is expired, or
    stops counting against ``max_active_sessions``."""
    async with ContextEngine(
        db_url, settings=settings(max_active_sessions=2), clock=clock
    ) as engine:
        clock.advance(2)  # both inside one bucket, away from its edges
        await engine.create_session("older", "u")
        clock.advance(0.5)
        await engine.create_session("newer", "u")
        clock.advance(60 - 0.25)  # older idle 60.25 s, newer 59.75 s; timeout 60 s
        await engine.create_session("third", "u")  # older no longer counts
        with pytest.raises(SessionLimitError):
            await engine.create_session("fourth", "u")
        assert await engine.cleanup_inactive_sessions() == 1
        statuses = {s.session_id: s.status for s in await engine.list_sessions()}
        assert statuses == {
            "older": SessionStatus.EXPIRED,
            "newer": SessionStatus.ACTIVE,
            "third": SessionStatus.ACTIVE,
        }
        clock.advance(0.5)
        assert await engine.cleanup_inactive_sessions() == 1
        assert (await engine.get_session("newer")).status is SessionStatus.EXPIRED  # type: ignore[union-attr]


async def test_the_background_task_expires_sessions(db_url: str, clock: FakeClock) -> None:
    cfg = settings(auto_cleanup=True, cleanup_interval=0.05)
    async with ContextEngine(db_url, settings=cfg, clock=clock) as engine:
        expired = asyncio.Event()
        engine.subscribe(lambda e: expired.set(), "session.expired")
        await engine.create_session("s", "u")
        clock.advance(61)
        await asyncio.wait_for(expired.wait(), timeout=10)
        assert (await engine.get_session("s")).status is SessionStatus.EXPIRED  # type: ignore[union-attr]


async def test_the_loop_survives_failing_sweeps_and_stops_quickly(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    cfg = settings(auto_cleanup=True, cleanup_interval=0.02)
    engine = ContextEngine(db_url, settings=cfg, clock=clock)
    await engine.initialize()
    sweeps = engine._live.sessions  # type: ignore[union-attr]
    real = sweeps.expire_stale
    calls = 0

    async def flaky(*args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("database hiccup")
        return await real(*args)

    monkeypatch.setattr(sweeps, "expire_stale", flaky)
    expired = asyncio.Event()
    engine.subscribe(lambda e: expired.set(), "session.expired")
    await engine.create_session("s", "u")
    clock.advance(61)
    await asyncio.wait_for(expired.wait(), timeout=10)
    assert calls >= 3
    assert "cleanup sweep failed" in caplog.text
    started = time.monotonic()
    await engine.close()
    assert time.monotonic() - started < 3  # "within a second", loosely


async def test_close_cancels_a_hung_sweep(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ContextEngine(db_url, settings=settings(auto_cleanup=True, cleanup_interval=0.01))
    await engine.initialize()
    entered = asyncio.Event()

    async def hang(*args: Any) -> int:
        entered.set()
        await asyncio.sleep(3600)
        return 0

    monkeypatch.setattr(engine._live.sessions, "expire_stale", hang)  # type: ignore[union-attr]
    await asyncio.wait_for(entered.wait(), timeout=10)
    started = time.monotonic()
    await engine.close()
    assert time.monotonic() - started < 3


async def test_two_engines_announce_each_expiry_once(db_url: str, clock: FakeClock) -> None:
    cfg = settings(auto_cleanup=True, cleanup_interval=0.01)
    async with (
        ContextEngine(db_url, settings=cfg, clock=clock) as one,
        ContextEngine(db_url, settings=cfg, clock=clock) as two,
    ):
        seen: Counter[str] = Counter()
        totals: list[int] = []
        all_seen = asyncio.Event()

        def record(event: Event) -> None:
            seen.update([event.session_id])
            if len(seen) == 300:
                all_seen.set()

        for engine in (one, two):
            engine.subscribe(record, "session.expired")
            engine.subscribe(lambda e: totals.append(e.data["expired"]), "cleanup.completed")
        for i in range(300):
            await one.create_session(f"s{i}", "u")
        clock.advance(61)
        await asyncio.wait_for(all_seen.wait(), timeout=30)
        await asyncio.sleep(0.1)  # a late duplicate would show up here
    assert len(seen) == 300 and set(seen.values()) == {1}
    assert sum(totals) == 300


async def test_touches_within_a_bucket_are_hot_updates_on_postgres(
    pg_admin: asyncpg.Connection, clock: FakeClock
) -> None:
    """No index covers ``last_activity``, so on PostgreSQL a touch that stays in its
    idle bucket is a HOT update: it writes no index entry (with the old index on
    (status, last_activity), none of these updates was)."""
    url = await new_pg_database(pg_admin)
    database = url.rsplit("/", 1)[1]
    try:
        async with ContextEngine(url, settings=settings(), clock=clock) as engine:
            await engine.create_session("s", "u")
            for _ in range(20):  # 4 s in all: one bucket
                clock.advance(0.2)
                await engine.update_session("s", increment_requests=True)
                await engine.add_message("s", "user", "hi")
        # the engine's server processes report their statistics as they end
        probe = await asyncpg.connect(f"{PG_SERVER.rsplit('/', 1)[0]}/{database}")
        try:
            for _ in range(100):
                updated, hot = await probe.fetchrow(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = 'ctx_sessions'"
                )
                if updated >= 40:
                    break
                await asyncio.sleep(0.1)
        finally:
            await probe.close()
        assert updated >= 40
        assert hot == updated
    finally:
        await pg_admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
