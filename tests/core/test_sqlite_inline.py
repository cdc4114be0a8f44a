"""SQLite statements run on the event loop thread: nothing may wait for a lock there."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine import ContextEngine, EngineSettings

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
