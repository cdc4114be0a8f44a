"""Per-session idle timeouts: each session expires after its own idleness, or never."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine.errors import SessionExpiredError, SessionLimitError, ValidationError
from tests.fixtures import FakeClock

DAY = 86_400.0
QUIET = {"auto_cleanup": False}


async def test_a_session_without_idle_timeout_never_expires_for_idleness(
    db_url: str, clock: FakeClock
) -> None:
    """Lazy expiry, the sweep and is_expired() all honour each session's own timeout;
    the engine's setting is only the default."""
    settings = EngineSettings(**QUIET, session_timeout=60)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        forever = await engine.create_session("forever", "u", idle_timeout=None)
        short = await engine.create_session("short", "u", idle_timeout=10)
        default = await engine.create_session("default", "u")
        assert (forever.idle_timeout, short.idle_timeout, default.idle_timeout) == (None, 10, 60)

        clock.advance(11)
        with pytest.raises(SessionExpiredError):  # lazily, by its own 10 s
            await engine.touch("short")
        await engine.touch("default")  # 11 s < 60 s

        clock.advance(30 * DAY)
        read = await engine.get_session("forever")
        assert read is not None and not read.is_expired()
        assert read.is_expired(60)  # an explicit limit still applies to it
        assert await engine.cleanup_inactive_sessions() == 1  # "default" only
        resumed = await engine.update_session("forever", increment_requests=True)
        assert resumed.status is SessionStatus.ACTIVE and resumed.request_count == 1
        statuses = {s.session_id: s.status for s in await engine.list_sessions()}
        assert statuses == {
            "forever": SessionStatus.ACTIVE,
            "short": SessionStatus.EXPIRED,
            "default": SessionStatus.EXPIRED,
        }


async def test_the_setting_none_means_sessions_never_idle(db_url: str, clock: FakeClock) -> None:
    settings = EngineSettings(**QUIET, session_timeout=None)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        session = await engine.create_session("s", "u")
        assert session.idle_timeout is None
        clock.advance(365 * DAY)
        assert await engine.cleanup_inactive_sessions() == 0
        assert (await engine.touch("s")).status is SessionStatus.ACTIVE


async def test_an_explicit_sweep_limit_applies_to_every_session(
    db_url: str, clock: FakeClock
) -> None:
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET), clock=clock) as engine:
        await engine.create_session("forever", "u", idle_timeout=None)
        await engine.create_session("long", "u", idle_timeout=10 * DAY)
        await engine.create_session("busy", "u", idle_timeout=None)
        clock.advance(2 * DAY)
        await engine.touch("busy")
        assert await engine.cleanup_inactive_sessions(max_idle_seconds=DAY) == 2
        stored = {s.session_id: s.status for s in await engine.list_sessions()}
        assert stored["busy"] is SessionStatus.ACTIVE
        assert stored["forever"] is stored["long"] is SessionStatus.EXPIRED


async def test_activity_moves_the_deadline_of_a_timeout_of_its_own(
    db_url: str, clock: FakeClock
) -> None:
    """Each touch, and resuming, starts the session's own timeout again; the sweep
    takes exactly the sessions past it."""
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET), clock=clock) as engine:
        await engine.create_session("s", "u", idle_timeout=100)
        for _ in range(5):
            clock.advance(100)  # exactly the timeout: not idle *longer* than it
            await engine.update_session("s", increment_requests=True)
        await engine.pause_session("s")
        clock.advance(100)
        await engine.resume_session("s")
        clock.advance(100)
        assert await engine.cleanup_inactive_sessions() == 0
        clock.advance(0.001)
        assert await engine.cleanup_inactive_sessions() == 1


async def test_sessions_that_never_idle_still_count_toward_limits_and_deadlines(
    db_url: str, clock: FakeClock
) -> None:
    settings = EngineSettings(**QUIET, max_sessions_per_user=1)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        await engine.create_session(
            "s", "u", idle_timeout=None, expires_at=clock.now + timedelta(days=2)
        )
        clock.advance(DAY)
        with pytest.raises(SessionLimitError):
            await engine.create_session("t", "u")
        clock.advance(DAY)  # its expires_at
        with pytest.raises(SessionExpiredError):
            await engine.touch("s")
        await engine.create_session("t", "u")


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "60", True])
async def test_a_bad_idle_timeout_is_refused_and_nothing_written(
    engine: ContextEngine, bad: object
) -> None:
    with pytest.raises(ValidationError):
        await engine.create_session("s", "u", idle_timeout=bad)  # type: ignore[arg-type]
    assert await engine.get_session("s") is None


async def test_idle_timeout_survives_export_import_and_templates(
    db_url: str, clock: FakeClock
) -> None:
    from ctxengine import SessionTemplate

    async with ContextEngine(db_url, settings=EngineSettings(**QUIET), clock=clock) as engine:
        await engine.create_session("s", "u", idle_timeout=None)
        data = await engine.export_session("s")
        assert data["session"]["idle_timeout"] is None
        copy = await engine.import_session(data, new_session_id="copy")
        assert copy.idle_timeout is None
        del data["session"]["idle_timeout"]  # a document of an earlier version
        older = await engine.import_session(data, new_session_id="older")
        assert older.idle_timeout == engine.settings.session_timeout
        template = SessionTemplate(name="bot")
        made = await engine.create_session_from_template(template, "u", idle_timeout=5)
        assert made.idle_timeout == 5
        clock.advance(30 * DAY)
        assert await engine.cleanup_inactive_sessions() == 2  # "older" and the template's
        assert (await engine.touch("copy")).status is SessionStatus.ACTIVE


async def test_the_migration_gives_existing_sessions_the_settings_timeout(
    tmp_path: object,
) -> None:
    """Sessions stored before 0007 get the migrating engine's session_timeout, and
    chats without a cap its max_messages_per_chat."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    settings = EngineSettings(**QUIET, session_timeout=123, max_messages_per_chat=7)
    await ContextEngine(url, settings=settings).migrate("0006_idle_bucket")
    import sqlite3

    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute(
            "INSERT INTO ctx_sessions (tenant_id, session_id, user_id, tier, status, metadata,"
            " tags, preferences, created_at, last_activity, request_count, error_count,"
            " total_processing_time, current_chat_id, chat_count) VALUES ('default', 'old',"
            " 'u', 'free', 'active', '{}', '[]', '{}', '2030-01-01 00:00:00.000000',"
            " '2030-01-01 00:00:00.000000', 0, 0, 0.0, 'default', 1)"
        )
        db.execute(
            "INSERT INTO ctx_chats (tenant_id, session_id, chat_id, metadata, created_at,"
            " next_seq, message_count) VALUES ('default', 'old', 'default', '{}',"
            " '2030-01-01 00:00:00.000000', 0, 0)"
        )
    await ContextEngine(url, settings=settings).migrate()
    clock = FakeClock()
    async with ContextEngine(url, settings=settings, clock=clock) as engine:
        old = await engine.get_session("old")
        assert old is not None and old.idle_timeout == 123
        chat = await engine.get_chat("old", "default")
        assert chat is not None and chat.max_messages == 7
        clock.advance(123)
        assert await engine.cleanup_inactive_sessions() == 0
        clock.advance(1)
        assert await engine.cleanup_inactive_sessions() == 1
        async with engine._store.engine.connect() as conn:
            bucket = (await conn.execute(text("SELECT idle_bucket FROM ctx_sessions"))).scalar()
        assert bucket == (1_893_456_000 + 123) // 10


async def test_idle_for_lists_by_idleness_whatever_the_timeout(
    db_url: str, clock: FakeClock
) -> None:
    """list/count_sessions(idle_for=X) select sessions idle for X or more, those that
    never expire included, and change nothing."""
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET), clock=clock) as engine:
        await engine.create_session("forever", "u", idle_timeout=None)
        await engine.create_session("short", "u", idle_timeout=5)
        await engine.create_session("busy", "u", idle_timeout=None)
        clock.advance(DAY)
        await engine.touch("busy")
        idle = {s.session_id for s in await engine.list_sessions(idle_for=DAY)}
        assert idle == {"forever", "short"}
        assert await engine.count_sessions(idle_for=DAY) == 2
        assert {s.status for s in await engine.list_sessions()} == {SessionStatus.ACTIVE}
