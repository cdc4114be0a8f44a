"""Connections: on asyncpg a unit of work returns its pool entry to the store, which
hands it to the next unit (HeldConnections); the pool stays in charge of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import StorageTimeoutError
from ctxengine.storage import Store, postgres


@contextmanager
def pool_checkouts(store: Store) -> Iterator[list[object]]:
    """Every checkout from the store's pool while the block runs."""
    seen: list[object] = []

    def checkout(_dbapi: object, record: object, _proxy: object) -> None:
        seen.append(record)

    target = store.engine.sync_engine
    event.listen(target, "checkout", checkout)
    try:
        yield seen
    finally:
        event.remove(target, "checkout", checkout)


def open_connections(store: Store) -> int:
    pool = store.engine.sync_engine.pool
    return int(pool.checkedin() + pool.checkedout())  # type: ignore[attr-defined]


async def test_sequential_calls_take_one_connection_from_the_pool(pg_url: str) -> None:
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u")
        with pool_checkouts(engine._store) as checkouts:
            for _ in range(20):
                await engine.update_session("s", increment_requests=True)
        assert checkouts == []  # the entry create_session returned served them all
        assert (await engine.get_session("s")).request_count == 20  # type: ignore[union-attr]
        assert engine._store.connections_in_use() == 0


async def test_an_entry_out_for_long_goes_back_to_the_pool(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held longer than PING_AFTER_IDLE, an entry goes back to the pool, which pings an
    idle connection and recycles an old one on the next checkout."""
    monkeypatch.setattr(postgres, "PING_AFTER_IDLE", 0.0)
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u")
        with pool_checkouts(engine._store) as checkouts:
            for _ in range(5):
                await engine.update_session("s", increment_requests=True)
        assert len(checkouts) == 5


async def test_calls_waiting_for_the_pool_get_the_connections_returned(db_url: str) -> None:
    """A pool of one connection serves many concurrent calls: a returned entry goes to
    a call waiting for the pool instead of being held (else it would time out)."""
    settings = EngineSettings(auto_cleanup=False, pool_size=1, max_overflow=0, pool_timeout=3)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await asyncio.gather(
            *(engine.update_session("s", increment_requests=True) for _ in range(8))
        )
        assert (await engine.get_session("s")).request_count == 8  # type: ignore[union-attr]
        assert engine._store.connections_in_use() == 0


async def test_connections_above_pool_size_close_after_a_burst(pg_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, pool_size=1, max_overflow=4)
    async with ContextEngine(pg_url, settings=settings) as engine:
        store = engine._store

        async def busy(_conn: object) -> None:
            await asyncio.sleep(0.05)  # all five at once: the pool opens four above its size

        await asyncio.gather(*(store.run(busy) for _ in range(5)))
        assert open_connections(store) == 1
        assert store.connections_in_use() == 0


async def test_default_settings_open_no_connection_under_load(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    """On the default pool, 64 tasks at once neither open nor close a connection once
    the pool is warm: the server sees the same processes before and after (a pool that
    closes connections above its size on return opens new ones on every burst)."""

    async def server_processes() -> set[int]:
        rows = await pg_admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", pg_url.rsplit("/", 1)[1]
        )
        return {row["pid"] for row in rows}

    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        sids = [(await engine.create_session(user_id=f"u{t}")).session_id for t in range(64)]

        async def burst() -> None:
            await asyncio.gather(*(engine.update_session(s, increment_requests=True) for s in sids))

        await burst()  # warm-up: the pool opens what it keeps
        warm = await server_processes()
        assert 0 < len(warm) <= engine.settings.pool_size
        for _ in range(3):
            await burst()
            assert await server_processes() == warm
        assert {s.request_count for s in await engine.list_sessions(limit=100)} == {4}
        assert engine._store.connections_in_use() == 0


async def test_calls_beyond_the_pool_get_returned_connections_handed_over(pg_url: str) -> None:
    """64 calls at once on three connections: a unit waiting for a connection gets the
    one the next finishing unit returns, not a return to the pool and a checkout from
    it (which cost each call a round through the pool)."""
    settings = EngineSettings(auto_cleanup=False, pool_size=3)
    async with ContextEngine(pg_url, settings=settings) as engine:
        sids = [(await engine.create_session(user_id=f"u{t}")).session_id for t in range(64)]
        await asyncio.gather(*(engine.get_session(s) for s in sids))  # warm
        with pool_checkouts(engine._store) as checkouts:
            for _ in range(3):
                found = await asyncio.gather(*(engine.get_session(s) for s in sids))
        assert [s.session_id for s in found if s is not None] == sids
        assert len(checkouts) <= 3 * 3  # at most the pool's size per burst, not per call
        assert open_connections(engine._store) == 3
        assert engine._store.connections_in_use() == 0


async def test_a_call_waiting_past_pool_timeout_fails_and_cancelled_waits_leak_nothing(
    pg_url: str,
) -> None:
    settings = EngineSettings(auto_cleanup=False, pool_size=1, pool_timeout=0.3)
    async with ContextEngine(pg_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        store = engine._store
        release = asyncio.Event()

        async def occupy(_conn: object) -> None:
            await release.wait()

        busy = asyncio.ensure_future(store.run(occupy))
        await asyncio.sleep(0.05)
        with pytest.raises(StorageTimeoutError, match="pool_timeout"):
            await engine.get_session("s")
        waiting = [asyncio.ensure_future(engine.get_session("s")) for _ in range(5)]
        await asyncio.sleep(0.05)
        for call in waiting[:3]:
            call.cancel()
        release.set()
        await busy
        assert [s.session_id for s in await asyncio.gather(*waiting[3:])] == ["s", "s"]  # type: ignore[union-attr]
        assert all(call.cancelled() for call in waiting[:3])
        assert (await engine.get_session("s")) is not None
        assert store.connections_in_use() == 0


async def test_closing_the_engine_returns_every_connection(pg_url: str) -> None:
    engine = ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False))
    async with engine:
        await engine.create_session("s", "u")
        pool = engine._store.engine.sync_engine.pool
        assert pool.checkedout() == 1  # type: ignore[attr-defined]  # held for the next call
    assert pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_an_engine_passed_in_holds_no_connection(pg_url: str) -> None:
    """The application may share its AsyncEngine's pool: nothing stays checked out."""
    shared = create_async_engine(pg_url)
    try:
        async with ContextEngine(shared, settings=EngineSettings(auto_cleanup=False)) as engine:
            await engine.create_session("s", "u")
            await engine.update_session("s", increment_requests=True)
            assert shared.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await shared.dispose()


async def test_a_held_connection_the_server_closed_is_replaced(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u")
        killed = await pg_admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1",
            pg_url.rsplit("/", 1)[1],
        )
        assert killed == 1  # the held one
        for _ in range(100):  # asyncpg sees the connection closed when the loop reads it
            await asyncio.sleep(0.01)
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count == 1
        assert engine._store.connections_in_use() == 0


async def test_connections_above_pool_size_close_quietly_when_the_server_is_frozen(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Returned above pool_size while the server does not answer, a connection is
    closed after a short goodbye: the calls return, nothing is logged as an error (the
    driver's own goodbye waited out command_timeout, then the pool logged it)."""
    import time

    from tests.faults.test_timeouts import Proxy, through

    proxy = Proxy(int(pg_url.split("@", 1)[1].split("/", 1)[0].rsplit(":", 1)[1]))
    await proxy.start()
    settings = EngineSettings(
        auto_cleanup=False, pool_size=1, max_overflow=4, connect_timeout=3, statement_timeout=3
    )
    try:
        async with ContextEngine(through(pg_url, proxy), settings=settings) as engine:
            store = engine._store
            release = asyncio.Event()

            async def busy(_conn: object) -> None:
                await release.wait()  # all five out at once: four above pool_size

            calls = [asyncio.create_task(store.run(busy, write=False)) for _ in range(5)]
            await asyncio.sleep(0.2)
            assert store.connections_in_use() == 5
            proxy.pause()
            release.set()
            started = time.monotonic()
            await asyncio.gather(*calls)
            assert time.monotonic() - started < 2.0  # command_timeout is 3.3 s
            assert open_connections(store) == 1
            proxy.resume()
    finally:
        await proxy.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_a_database_refusing_connections_is_unavailable_then_works(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    """``ALLOW_CONNECTIONS false`` (SQLSTATE 55000): DatabaseUnavailableError, retryable;
    the same engine works once the database accepts connections again."""
    from ctxengine.errors import ConnectionLostError, DatabaseUnavailableError

    database = pg_url.rsplit("/", 1)[1]
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u")
        await pg_admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            await pg_admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                database,
            )
            with pytest.raises(DatabaseUnavailableError) as info:
                for _ in range(50):  # until the engine has to connect again
                    with contextlib.suppress(ConnectionLostError):  # its own, terminated
                        await engine.update_session("s", increment_requests=True)
                    await asyncio.sleep(0.01)
            assert info.value.retryable is True
            assert "does not accept connections" in str(info.value)
        finally:
            await pg_admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count >= 1
        assert engine._store.connections_in_use() == 0
