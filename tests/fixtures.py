"""Shared fixtures: a migrated database per test, on an SQLite file and on PostgreSQL.

Each is a copy of one database migrated once per test run (a file copy on SQLite,
``CREATE DATABASE … TEMPLATE`` on PostgreSQL), so tests do not pay for migrating.
PostgreSQL tests skip with a reason when no server answers, and fail under CI=true.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
        shutil.copyfile(await _sqlite_template(), tmp_path / "test.db")
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    admin = await pg_connect()
    url = await new_pg_database(admin, migrated=True)
    name = url.rsplit("/", 1)[1]
    try:
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
    url = await new_pg_database(pg_admin, migrated=True)
    try:
        yield url
    finally:
        await pg_admin.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _url(name: str) -> str:
    server = PG_SERVER.rsplit("/", 1)[0]
    return f"{server}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)


_templates: dict[str, str] = {}


async def _sqlite_template() -> Path:
    """An SQLite file migrated to head, once per test run."""
    if "sqlite" not in _templates:
        folder = tempfile.mkdtemp(prefix="ctx_template_")
        atexit.register(shutil.rmtree, folder, True)
        path = Path(folder) / "template.db"
        await ContextEngine(
            f"sqlite:///{path}", settings=EngineSettings(auto_cleanup=False)
        ).migrate()
        _templates["sqlite"] = str(path)
    return Path(_templates["sqlite"])


async def _pg_template(admin: asyncpg.Connection) -> str:
    """A PostgreSQL database migrated to head, once per test run (dropped at exit)."""
    if "postgres" not in _templates:
        name = f"ctx_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        atexit.register(_drop_database, name)
        await ContextEngine(_url(name), settings=EngineSettings(auto_cleanup=False)).migrate()
        _templates["postgres"] = name
    return _templates["postgres"]


def _drop_database(name: str) -> None:
    import asyncio

    async def drop() -> None:
        admin = await asyncpg.connect(PG_SERVER, timeout=5)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    try:
        asyncio.run(drop())
    except Exception:  # the server went away: nothing to clean up
        pass


async def new_pg_database(admin: asyncpg.Connection, *, migrated: bool = False) -> str:
    """Create a uniquely named database, empty or a copy of one migrated to head; its
    asyncpg URL."""
    name = f"ctx_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    template = f' TEMPLATE "{await _pg_template(admin)}"' if migrated else ""
    await admin.execute(f'CREATE DATABASE "{name}"{template}')
    return _url(name)


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


async def connections_returned(engine: ContextEngine, seconds: float = 5.0) -> int:
    """Wait up to ``seconds`` for the connections of cancelled calls to settle and go
    back to the pool (a worker thread's wait, a rollback in a task of the engine's);
    the number still checked out."""
    import asyncio

    for _ in range(int(seconds / 0.01)):
        if engine._store.connections_in_use() == 0:
            break
        await asyncio.sleep(0.01)
    return engine._store.connections_in_use()


def watch_deadlocks(*engines: ContextEngine) -> list[BaseException]:
    """The deadlocks (SQLSTATE 40P01) the engines will meet: each is recorded as their
    backend judges it transient (and retries it)."""
    deadlocks: list[BaseException] = []
    for engine in engines:
        backend = engine._store.backend
        transient = backend.is_transient

        def watched(exc: BaseException, transient: Any = transient) -> bool:
            orig = getattr(exc, "orig", exc)
            if getattr(orig, "sqlstate", None) == "40P01":
                deadlocks.append(exc)
            return bool(transient(exc))

        backend.is_transient = watched  # type: ignore[method-assign]
    return deadlocks
