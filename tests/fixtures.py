"""Shared fixtures: a migrated database per test, on an SQLite file and on PostgreSQL.

PostgreSQL tests skip with a reason when no server answers, and fail under CI=true.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from ctxengine import ContextEngine, EngineSettings

PG_SERVER = os.environ.get("CTXENGINE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("CI") == "true" or os.environ.get("CTXENGINE_REQUIRE_POSTGRES") == "1"


async def pg_connect() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_SERVER, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required under CI but unreachable at {PG_SERVER}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_SERVER} ({exc}); set CI=true to require it")


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The URL of a fresh database, already migrated to head."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        await ContextEngine(url, settings=EngineSettings(auto_cleanup=False)).migrate()
        yield url
        return
    admin = await pg_connect()
    url = await new_pg_database(admin)
    name = url.rsplit("/", 1)[1]
    try:
        await ContextEngine(url, settings=EngineSettings(auto_cleanup=False)).migrate()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def pg_admin() -> AsyncIterator[asyncpg.Connection]:
    """An admin connection to the PostgreSQL server (skips/fails as above)."""
    admin = await pg_connect()
    yield admin
    await admin.close()


@pytest.fixture
async def pg_url(pg_admin: asyncpg.Connection) -> AsyncIterator[str]:
    """A fresh migrated PostgreSQL database, for what only PostgreSQL has."""
    url = await new_pg_database(pg_admin)
    try:
        await ContextEngine(url, settings=EngineSettings(auto_cleanup=False)).migrate()
        yield url
    finally:
        await pg_admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


async def new_pg_database(admin: asyncpg.Connection) -> str:
    """Create an empty, uniquely named database; its asyncpg URL."""
    name = f"ctx_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    server = PG_SERVER.rsplit("/", 1)[0]
    return f"{server}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)


class FakeClock:
    """An injectable clock that moves only when told."""

    def __init__(self) -> None:
        from datetime import UTC, datetime

        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self):  # type: ignore[no-untyped-def]
        return self.now

    def advance(self, seconds: float) -> None:
        from datetime import timedelta

        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    yield FakeClock()


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[ContextEngine]:
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as eng:
        yield eng
        assert eng._store.connections_in_use() == 0
