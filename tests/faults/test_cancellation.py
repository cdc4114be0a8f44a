"""Cancelling a call hands control back to the event loop at once, whatever the
database is doing, and leaves no partial write and no connection checked out."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

from ctxengine import ContextEngine, EngineSettings
from tests.faults.test_sqlite import release, sqlite_path, write_lock  # noqa: F401

#: Long enough that a loop blocked for the busy wait could not go unnoticed.
BUSY_TIMEOUT = 5.0


async def test_cancelling_a_write_waiting_for_another_process_lock_frees_the_loop(
    sqlite_path: Path,  # noqa: F811
    write_lock: subprocess.Popen[str],  # noqa: F811
) -> None:
    """A write waiting (in a worker thread) for the write lock another process holds is
    cancelled: the loop goes on at once (a ticker keeps ticking; before, the loop
    stopped for the whole busy timeout), the cancelled write is never applied, and its
    connection is back in the pool once the wait ends."""
    settings = EngineSettings(
        auto_cleanup=False, auto_migrate=False, sqlite_busy_timeout=BUSY_TIMEOUT
    )
    async with ContextEngine(f"sqlite:///{sqlite_path}", settings=settings) as engine:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.ensure_future(ticker())
        started = time.monotonic()
        for _ in range(8):  # several waiting writers, each cancelled
            try:
                await asyncio.wait_for(engine.update_session("a", increment_requests=True), 0.1)
            except TimeoutError:
                pass
            else:
                raise AssertionError("the write lock is held: the update cannot finish")
        waited = time.monotonic() - started
        assert waited < BUSY_TIMEOUT  # far below 8 busy timeouts: the loop was free
        assert ticks > 8 * 0.1 / 0.01 / 4  # and it ran other tasks meanwhile
        ticking.cancel()

        release(write_lock)
        for _ in range(500):  # the worker threads see the lock free and give back
            if engine._store.connections_in_use() == 0:
                break
            await asyncio.sleep(0.01)
        assert engine._store.connections_in_use() == 0
        session = await engine.get_session("a")
        assert session is not None and session.request_count == 0  # none applied
        assert (await engine.update_session("a", increment_requests=True)).request_count == 1


async def test_close_under_load_lets_calls_finish_or_refuse_them(db_url: str) -> None:
    """8 tasks update one session while the engine closes: each call either finished
    (and is counted) or raised EngineClosedError; nothing else escapes."""
    from ctxengine.errors import EngineClosedError

    engine = ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False))
    await engine.initialize()
    await engine.create_session("s", "u", idle_timeout=None)
    done = 0

    async def writer() -> None:
        nonlocal done
        while True:
            await engine.update_session("s", increment_requests=True)
            done += 1

    tasks = [asyncio.ensure_future(writer()) for _ in range(8)]
    await asyncio.sleep(0.3)
    await engine.close()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert {type(outcome) for outcome in outcomes} == {EngineClosedError}
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as again:
        session = await again.get_session("s")
        assert session is not None and session.request_count == done > 0


async def test_thousands_of_cancellations_on_postgres_print_nothing(
    pg_url: str, caplog: Any
) -> None:
    """1,600 calls cancelled at random points (while connecting, waiting for the pool,
    running a statement, returning a connection): nothing is logged or printed (no
    'Future exception was never retrieved', no 'Exception closing connection'), no
    connection stays checked out, and the engine goes on working."""
    import gc
    import logging
    import random

    caplog.set_level(logging.WARNING)
    random.seed(7)
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u", idle_timeout=None)
        finished = 0

        async def one() -> None:
            nonlocal finished
            call = engine.update_session("s", increment_requests=True)
            try:
                await asyncio.wait_for(call, random.uniform(0.0001, 0.004))
                finished += 1
            except TimeoutError:
                pass

        for _ in range(200):
            await asyncio.gather(*(one() for _ in range(8)))
        for _ in range(300):  # calls cancelled mid-flight finish in the background
            if engine._store.connections_in_use() == 0:
                break
            await asyncio.sleep(0.01)
        assert engine._store.connections_in_use() == 0
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count >= finished + 1  # cancelled ones may have committed
    gc.collect()  # futures whose error nobody retrieved are reported when collected
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
