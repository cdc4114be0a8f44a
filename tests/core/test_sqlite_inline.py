"""SQLite statements run on the event loop thread: nothing may wait for a lock there."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine import ContextEngine, EngineSettings
from tests.fixtures import connections_returned

SETTINGS = EngineSettings(auto_cleanup=False)


async def test_a_write_waits_for_another_writer_off_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "inline.db"
    async with ContextEngine(f"sqlite:///{path}", settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        holding, release = threading.Event(), threading.Event()

        def hold_the_write_lock() -> None:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")
            other.execute("UPDATE ctx_sessions SET request_count = 100")
            holding.set()
            release.wait(10)
            other.execute("COMMIT")
            other.close()

        holder = threading.Thread(target=hold_the_write_lock)
        holder.start()
        await asyncio.to_thread(holding.wait, 10)
        update = asyncio.create_task(engine.update_session("s", increment_requests=True))
        ticks = 0
        for _ in range(20):  # the loop keeps running while the update waits for the lock
            await asyncio.sleep(0.01)
            ticks += 1
        assert not update.done()
        release.set()
        session = await update
        await asyncio.to_thread(holder.join)
        assert ticks == 20
        assert session.request_count == 101  # applied after the other writer committed


async def test_an_aiosqlite_engine_given_by_the_caller_is_used_as_it_is(tmp_path: Path) -> None:
    given = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'given.db'}")
    try:
        async with ContextEngine(given, settings=SETTINGS) as engine:
            await engine.create_session("s", "u")
            await engine.add_message("s", "user", "hello")
            assert (await engine.update_session("s", increment_requests=True)).request_count == 1
            assert [m.content for m in await engine.get_messages("s")] == ["hello"]
            assert engine._store.engine is given
    finally:
        await given.dispose()


async def test_prebuilt_statements_convert_values_as_sqlalchemy_does(tmp_path: Path) -> None:
    """A prebuilt statement run on sqlite3 directly stores what SQLAlchemy would store
    (timestamps in its text form, so comparisons hold) and reads the same values."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import text

    from ctxengine.storage.prebuilt import run, run_dicts
    from ctxengine.storage.repositories import sessions as repo
    from ctxengine.storage.sqlite import InlineConnection

    async with ContextEngine(f"sqlite:///{tmp_path / 'prebuilt.db'}", settings=SETTINGS) as engine:
        await engine.create_session("s", "u", metadata={"k": [1, "ü"]})
        now = datetime(2031, 2, 3, 4, 5, 6, 789, tzinfo=UTC)
        params = {
            "tenant": "default",
            "sid": "s",
            "now": now,
            "now_epoch": (now - timedelta(days=3650)).timestamp(),
            "horizon": now + timedelta(seconds=31),
            "requests": 2,
            "errors": 1,
            "processing_time": 0.5,
        }
        sync = engine._store.engine.sync_engine
        with sync.connect() as conn:
            inline = InlineConnection(conn)
            written = (await run(inline, repo._RECORD_ACTIVE, params)).first()
            conn.commit()
            direct = (await run(inline, repo._GET_COUNTED, params)).first()
            through_sqlalchemy = conn.execute(repo._GET_COUNTED, params).first()
            as_dicts = await run_dicts(inline, repo._GET_COUNTED, params)
            stored = conn.execute(text("SELECT last_activity FROM ctx_sessions")).scalar_one()
        assert written is not None and direct is not None and through_sqlalchemy is not None
        assert tuple(written) == tuple(direct) == tuple(through_sqlalchemy)
        assert as_dicts == [dict(through_sqlalchemy._mapping)]
        assert direct.last_activity == now and direct._mapping["metadata"] == {"k": [1, "ü"]}
        assert (direct.request_count, direct.error_count) == (2, 1)
        assert stored == "2031-02-03 04:05:06.000789"


async def test_a_timeout_around_a_write_waiting_for_the_lock_is_a_timeout(tmp_path: Path) -> None:
    """``asyncio.timeout`` and ``wait_for`` turn the cancellation of a write that waits
    for another writer's lock into TimeoutError (they do so only for CancelledError
    itself: a subclass reached the caller as a cancellation of its own task)."""
    path = tmp_path / "timeout.db"
    async with ContextEngine(f"sqlite:///{path}", settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await engine.update_session("s", increment_requests=True)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.add_message("s", "user", "x"), 0.2)
        finally:
            other.execute("ROLLBACK")
            other.close()
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count == 1  # the timed-out ones were never applied
        assert await engine.get_messages("s") == []
        assert await connections_returned(engine) == 0
