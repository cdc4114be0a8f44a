"""Real faults of the machine's PostgreSQL: a database dropped under an open engine,
a role over its connection limit, backends terminated mid-load, nothing listening.
Each call fails with a StorageError subclass (never a raw driver error), writes
nothing, and the same engine works again once the fault is gone."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings, QuotaType
from ctxengine.errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    ReadOnlyDatabaseError,
    StorageError,
)

E = TypeVar("E", bound=StorageError)

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def as_admin(url: str) -> str:
    """The plain asyncpg URL of ``url`` as the superuser."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def raises_ours(kind: type[E], call: Awaitable[object]) -> E:
    """Await ``call``; it must raise ``kind`` (a class of ctxengine.errors, the driver's
    error as its cause), nothing else."""
    with pytest.raises(StorageError) as info:
        await call
    error = info.value
    assert isinstance(error, kind), repr(error)
    assert type(error).__module__ == "ctxengine.errors"
    assert error.__cause__ is not None and error.cause is not None
    assert error.operation
    return error


async def test_a_dropped_database_is_unavailable_then_recovers(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    name = database_of(pg_url)
    async with ContextEngine(pg_url, settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        await pg_admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')

        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: engine.create_session("new", "u"),
            lambda: engine.get_session("s"),
            lambda: engine.update_session("s", increment_requests=True),
            lambda: engine.list_sessions(),
            lambda: engine.track_usage("s", "op", QuotaType.API_CALLS),
            lambda: engine.add_message("s", "user", "hello"),
        ]
        for call in calls:
            error = await raises_ours(DatabaseUnavailableError, call())
            assert error.retryable is False
            assert f"database {name!r} does not exist" in str(error)
            assert "create it" in str(error)
            assert getattr(error.cause, "sqlstate", None) == "3D000"

        health = await engine.health_check()
        assert health["status"] == "unhealthy"
        assert health["error_type"] == "DatabaseUnavailableError"
        assert "does not exist" in health["error"] and health["retryable"] is False

        # the database comes back (empty, migrated): the same engine works again
        await pg_admin.execute(f'CREATE DATABASE "{name}"')
        await ContextEngine(pg_url, settings=SETTINGS).migrate()
        assert (await engine.health_check())["status"] == "healthy"
        assert await engine.get_session("new") is None  # the failed create wrote nothing
        session = await engine.create_session("new", "u")
        assert (
            await engine.update_session(session.session_id, increment_requests=True)
        ).request_count == 1
        assert engine._store.connections_in_use() == 0


async def test_a_missing_database_role_or_server_fails_initialize(pg_url: str) -> None:
    server = pg_url.rsplit("/", 1)[0]
    cases = [
        (f"{server}/ctx_no_such_database", False, "does not exist"),
        (
            pg_url.replace("postgres@", "ctx_no_such_role@", 1),
            False,
            "refuses role 'ctx_no_such_role'",
        ),
        ("postgresql+asyncpg://postgres@127.0.0.1:1/x", True, "nothing accepts connections"),
    ]
    for url, retryable, text in cases:
        engine = ContextEngine(url, settings=SETTINGS)
        error = await raises_ours(DatabaseUnavailableError, engine.initialize())
        assert error.retryable is retryable, url
        assert text in str(error)


async def test_too_many_connections_is_unavailable_and_retryable(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    role = f"ctx_fault_{uuid.uuid4().hex[:10]}"
    owner = await asyncpg.connect(as_admin(pg_url))
    await pg_admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        await owner.execute(
            f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}";'
            f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"'
        )
        url = pg_url.replace("postgres@", f"{role}@", 1)
        async with ContextEngine(url, settings=SETTINGS) as engine:
            await engine.create_session("before", "u")
            # the role may open no connection, and loses the ones it has
            await pg_admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
            await pg_admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                role,
            )
            # (a call that got a connection before the loop read the server's goodbye
            # would raise ConnectionLostError instead: that is the other test's case)
            await asyncio.sleep(0.1)
            for _ in range(2):
                error = await raises_ours(
                    DatabaseUnavailableError, engine.create_session("during", "u")
                )
                assert error.retryable is True
                assert getattr(error.cause, "sqlstate", None) == "53300"
                assert "accepts no more connections" in str(error)
            health = await engine.health_check()
            assert health["status"] == "unhealthy" and health["retryable"] is True

            await pg_admin.execute(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
            await engine.create_session("after", "u")
            assert await engine.get_session("during") is None
            assert await engine.count_sessions() == 2
            assert engine._store.connections_in_use() == 0
    finally:
        await owner.execute(f'DROP OWNED BY "{role}"')
        await owner.close()
        await pg_admin.execute(f'DROP ROLE "{role}"')


async def test_backends_terminated_mid_load_raise_connection_lost(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    name = database_of(pg_url)
    async with ContextEngine(pg_url, settings=SETTINGS) as engine:
        await engine.create_session("s", "u", tier="enterprise")
        accepted: Counter[str] = Counter()
        lost: Counter[str] = Counter()
        stop = time.monotonic() + 1.5

        async def writer(kind: str) -> None:
            while time.monotonic() < stop:
                try:
                    if kind == "requests":
                        await engine.update_session("s", increment_requests=True)
                    else:
                        await engine.track_usage("s", "op", QuotaType.API_CALLS)
                except ConnectionLostError as exc:
                    # anything else (a raw driver error above all) fails the test
                    assert exc.retryable is True and exc.cause is not None
                    lost[kind] += 1
                else:
                    accepted[kind] += 1

        async def killer() -> int:
            kills = 0
            while time.monotonic() < stop:
                await asyncio.sleep(0.1)
                kills += await pg_admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    name,
                )
            return kills

        kills, *_ = await asyncio.gather(
            killer(), *(writer(kind) for kind in ("requests", "usage") * 4)
        )
        assert kills > 0 and sum(lost.values()) > 0
        await asyncio.sleep(0.1)  # the loop reads the goodbyes of the last backends killed

        # Acknowledged writes are all there. A call whose commit the server made but
        # whose answer was lost may be there too: at most one per lost call.
        session = await engine.get_session("s")
        assert session is not None
        assert accepted["requests"] <= session.request_count
        assert session.request_count <= accepted["requests"] + lost["requests"]
        used = (await engine.get_quota("s", QuotaType.API_CALLS)).used
        records = len(await engine.get_usage_history(session_id="s", limit=100_000))
        assert used == records  # the counter and the record are one transaction
        assert accepted["usage"] <= records <= accepted["usage"] + lost["usage"]
        assert (await engine.health_check())["status"] == "healthy"
        assert engine._store.connections_in_use() == 0


async def test_a_read_only_database_refuses_writes(
    pg_url: str, pg_admin: asyncpg.Connection
) -> None:
    name = database_of(pg_url)

    async def reconnect_all() -> None:
        # database settings apply to new connections: make the engine open new ones
        await pg_admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await asyncio.sleep(0.1)

    async with ContextEngine(pg_url, settings=SETTINGS) as engine:
        await engine.create_session("s", "u")
        await pg_admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await reconnect_all()
        try:
            assert await engine.get_session("s") is not None  # reads work
            for call in (
                engine.create_session("new", "u"),
                engine.update_session("s", increment_requests=True),
                engine.add_message("s", "user", "hello"),
            ):
                error = await raises_ours(ReadOnlyDatabaseError, call)
                assert error.retryable is False
                assert getattr(error.cause, "sqlstate", None) == "25006"
                assert "accepts no writes" in str(error)
        finally:
            await pg_admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await reconnect_all()
        assert await engine.get_session("new") is None
        session = await engine.update_session("s", increment_requests=True)
        assert session.request_count == 1  # the failed increment wrote nothing
        assert await engine.get_messages("s") == []
