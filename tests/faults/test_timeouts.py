"""connect_timeout and statement_timeout on real faults: a row lock another connection
holds, a server that accepts connections and never answers, and a server that stops
answering an established engine (a TCP proxy that stops forwarding). Each call ends
with a StorageError subclass within connect_timeout + statement_timeout, writes
nothing, and the same engine works once the server answers again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import DatabaseUnavailableError, StorageError, StorageTimeoutError

from .proxy import Proxy, through
from .test_postgres import as_admin

CONNECT_TIMEOUT = 0.5
STATEMENT_TIMEOUT = 0.5
BOUND = CONNECT_TIMEOUT + STATEMENT_TIMEOUT
#: What a loaded 2-core machine may add to a bound (scheduling, connecting, cleanup).
SLACK = 4.0
SETTINGS = EngineSettings(
    auto_cleanup=False,
    auto_migrate=False,
    connect_timeout=CONNECT_TIMEOUT,
    statement_timeout=STATEMENT_TIMEOUT,
)


async def fails_in_time(
    call: Awaitable[object], bound: float, *kinds: type[StorageError]
) -> StorageError:
    """Await ``call``: it must raise one of ``kinds`` (retryable, ours) within ``bound``
    seconds plus slack."""
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        await call
    elapsed = time.monotonic() - started
    error = info.value
    assert isinstance(error, kinds), repr(error)
    assert type(error).__module__ == "ctxengine.errors"
    assert error.retryable is True and error.cause is not None and error.operation
    assert elapsed < bound + SLACK, f"{error.operation} took {elapsed:.2f} s"
    return error


async def test_a_statement_blocked_by_a_row_lock_times_out(pg_url: str) -> None:
    async with ContextEngine(pg_url, settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        locker = await asyncpg.connect(as_admin(pg_url))
        try:
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM ctx_sessions WHERE session_id = 's' FOR UPDATE")
                started = time.monotonic()
                error = await fails_in_time(
                    engine.update_session("s", increment_requests=True),
                    STATEMENT_TIMEOUT,
                    StorageTimeoutError,
                )
                assert time.monotonic() - started >= STATEMENT_TIMEOUT * 0.9
                # the server cancelled it (57014), or, racing it, the client gave up
                assert getattr(error.cause, "sqlstate", None) == "57014" or isinstance(
                    error.cause, TimeoutError
                ), repr(error.cause)

                # without a statement timeout, the same call waits for the lock
                patient = EngineSettings(
                    auto_cleanup=False, auto_migrate=False, statement_timeout=None
                )
                async with ContextEngine(pg_url, settings=patient) as waiting:
                    call = asyncio.create_task(waiting.update_session("s", increment_requests=True))
                    await asyncio.sleep(STATEMENT_TIMEOUT * 2)
                    assert not call.done()
                    await locker.execute("ROLLBACK; BEGIN")  # the lock is released
                    assert (await call).request_count == 1
        finally:
            await locker.close()
        # the timed-out call wrote nothing; the engine works on
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count == 2
        assert engine._store.connections_in_use() == 0


async def test_a_server_that_never_answers_times_out(
    pg_url: str, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    url = through(pg_url, proxy)
    proxy.pause()  # it accepts connections and never answers
    await fails_in_time(
        ContextEngine(url, settings=SETTINGS).initialize(), CONNECT_TIMEOUT, StorageTimeoutError
    )
    proxy.resume()

    async with ContextEngine(url, settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        # the engine's connections break, and new ones are never answered
        proxy.pause()
        proxy.drop()
        await asyncio.sleep(0.1)  # the engine's loop reads that its connections closed
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: engine.create_session("new", "u"),
            lambda: engine.get_session("s"),
            lambda: engine.update_session("s", increment_requests=True),
        ]
        for call in calls:
            await fails_in_time(
                call(), CONNECT_TIMEOUT, StorageTimeoutError, DatabaseUnavailableError
            )
        started = time.monotonic()
        health = await engine.health_check()
        assert time.monotonic() - started < CONNECT_TIMEOUT + SLACK
        assert health["status"] == "unhealthy" and health["retryable"] is True
        assert health["error_type"] in ("StorageTimeoutError", "DatabaseUnavailableError")

        proxy.resume()
        assert (await engine.health_check())["status"] == "healthy"
        assert await engine.get_session("new") is None
        assert (await engine.update_session("s", increment_requests=True)).request_count == 1
        assert engine._store.connections_in_use() == 0
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


async def test_a_server_that_stops_answering_an_open_engine_times_out(
    pg_url: str, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    async with ContextEngine(through(pg_url, proxy), settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        await engine.add_message("s", "user", "before")
        proxy.pause()  # frozen: the engine's connections stay open, nothing comes back
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: engine.update_session("s", increment_requests=True),  # one statement
            lambda: engine.add_message("s", "user", "during"),  # a transaction
            lambda: engine.get_session("s"),  # a read
            lambda: engine.create_session("new", "u"),
        ]
        for call in calls:
            await fails_in_time(call(), BOUND, StorageError)
        started = time.monotonic()
        health = await engine.health_check()
        assert time.monotonic() - started < BOUND + SLACK
        assert health["status"] == "unhealthy" and health["retryable"] is True
        proxy.resume()
        assert (await engine.health_check())["status"] == "healthy"

        # frozen mid-transaction: a write (its UPDATE, then a check, then COMMIT) waits
        # on a row lock; the server stops answering, then the lock is released (the
        # server's answer is held back, and the COMMIT never reaches it)
        locker = await asyncpg.connect(as_admin(pg_url))
        try:
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM ctx_sessions WHERE session_id = 's' FOR UPDATE")
                started = time.monotonic()
                call = asyncio.create_task(engine.update_session("s", metadata={"k": 1}))
                await asyncio.sleep(STATEMENT_TIMEOUT / 4)
                assert not call.done()
                proxy.pause()
            error = await fails_in_time(call, BOUND, StorageError)
            assert time.monotonic() - started < BOUND + SLACK, repr(error)
        finally:
            await locker.close()
        proxy.resume()

        # nothing was written (a one-statement write the server received before it
        # stopped answering may have been applied: its answer was lost)
        session = await engine.get_session("s")
        assert session is not None and session.request_count <= 1
        assert session.metadata == {}
        assert [m.content for m in await engine.get_messages("s")] == ["before"]
        assert await engine.get_session("new") is None
        await engine.add_message("s", "user", "after")
        assert engine._store.connections_in_use() == 0
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]


async def test_retries_stop_by_the_deadline(pg_url: str, pg_admin: asyncpg.Connection) -> None:
    # every lock wait fails after 50 ms with 55P03, a transient error retried whole
    name = pg_url.rsplit("/", 1)[1]
    await pg_admin.execute(f'ALTER DATABASE "{name}" SET lock_timeout = 50')
    settings = SETTINGS.model_copy(update={"transient_retries": 10_000})
    async with ContextEngine(pg_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        locker = await asyncpg.connect(as_admin(pg_url))
        try:
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM ctx_sessions WHERE session_id = 's' FOR UPDATE")
                started = time.monotonic()
                await fails_in_time(
                    engine.update_session("s", increment_requests=True),
                    BOUND,
                    StorageTimeoutError,
                )
                # retried until the deadline, not 10,000 times
                assert time.monotonic() - started >= BOUND * 0.5
        finally:
            await locker.close()
        assert (await engine.update_session("s", increment_requests=True)).request_count == 1


@pytest.mark.parametrize("fault", ["frozen", "slow"])
async def test_health_check_takes_one_bound(
    fault: str, pg_url: str, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """health_check pings and reads the schema revision in one unit of work, so it
    reports "unhealthy" within one call's deadline (connect_timeout +
    statement_timeout). A frozen server answers nothing; a slow one answers each
    statement in 1.4 s, within statement_timeout, but the probe's statements together
    take longer than the deadline. (Before, the ping succeeded there and the revision
    read that followed, a unit of work of its own, ran into a deadline of its own:
    the report took 1.7 times the bound.)"""
    settings = SETTINGS.model_copy(update={"connect_timeout": 0.2, "statement_timeout": 1.8})
    bound = 2.0
    async with ContextEngine(through(pg_url, proxy), settings=settings) as engine:
        healthy = await engine.health_check()
        assert healthy["status"] == "healthy" and healthy["schema_revision"], healthy
        store = engine._store
        units = 0
        run = store.run

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal units
            units += 1
            return await run(*args, **kwargs)

        monkeypatch.setattr(store, "run", counted)
        if fault == "frozen":
            proxy.pause()  # the engine's connections stay open, nothing comes back
        else:
            proxy.slow(0.7)  # each way: a round trip takes 1.4 s
        started = time.monotonic()
        health = await engine.health_check()
        took = time.monotonic() - started
        print(f"\nhealth_check on a {fault} server: {took:.2f} s (bound {bound:g} s)")
        assert health["status"] == "unhealthy" and health["retryable"] is True, health
        assert health["error_type"] == "StorageTimeoutError", health
        assert health["schema_revision"] is None
        assert took < bound * 1.35, f"{took:.2f} s, past the deadline of {bound:g} s"
        assert units == 1  # one unit of work, one deadline
        proxy.resume()
        proxy.slow(0)
        assert (await engine.health_check())["status"] == "healthy"


@pytest.mark.parametrize("then", ["refuse", "freeze"])
async def test_the_event_relay_failing_to_start_fails_initialize_classified(
    then: Literal["refuse", "freeze"], pg_url: str, proxy: Proxy
) -> None:
    """cross_process_events: the engine connects, then its listening connection is
    refused (nothing listens any more) or never answered (within connect_timeout).
    initialize() raises the classified StorageError subclass (operation, cause,
    retryable), the engine stays closed, and it opens once the server answers."""
    settings = SETTINGS.model_copy(update={"cross_process_events": True})
    proxy.admit(1, then)  # the engine's first connection passes; the relay's does not
    engine = ContextEngine(through(pg_url, proxy), settings=settings)
    kind = DatabaseUnavailableError if then == "refuse" else StorageTimeoutError
    error = await fails_in_time(engine.initialize(), CONNECT_TIMEOUT, kind)
    assert proxy.accepted == (1 if then == "refuse" else 2)
    assert error.operation == "initialize"
    assert "cannot listen for events of other engines" in str(error)
    assert isinstance(error.cause, ConnectionRefusedError if then == "refuse" else TimeoutError)
    assert not engine.is_open
    if then == "freeze":
        proxy.admit(0, "forward")  # the server answers again: the same engine opens
        async with engine:
            await engine.create_session("s", "u")
            relay = engine._runtime().ctx.relay
            assert relay is not None and relay.connected
