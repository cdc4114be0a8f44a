"""Real faults of SQLite: a read-only database, a write lock another process holds
past the busy timeout, a full database, a file that is not a database. Each call
fails with a StorageError subclass (never a raw sqlite3 error) and writes nothing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import (
    DatabaseFullError,
    DatabaseUnavailableError,
    ReadOnlyDatabaseError,
    StorageError,
    StorageTimeoutError,
)

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)


@pytest.fixture
async def sqlite_path(tmp_path: Path) -> Path:
    """A migrated SQLite file holding session "a"."""
    path = tmp_path / "faults.db"
    async with ContextEngine(f"sqlite:///{path}", settings=EngineSettings(auto_cleanup=False)) as e:
        await e.create_session("a", "u")
    return path


def ours(error: StorageError) -> None:
    assert type(error).__module__ == "ctxengine.errors"
    assert error.__cause__ is not None and error.cause is not None and error.operation


async def test_a_read_only_database_refuses_writes(sqlite_path: Path) -> None:
    url = f"sqlite:///file:{sqlite_path}?mode=ro&uri=true"
    async with ContextEngine(url, settings=SETTINGS) as engine:
        assert (await engine.get_session("a")) is not None  # reads work
        for call in (
            engine.create_session("b", "u"),
            engine.update_session("a", increment_requests=True),
            engine.add_message("a", "user", "hello"),
        ):
            with pytest.raises(ReadOnlyDatabaseError) as info:
                await call
            ours(info.value)
            assert info.value.retryable is False
            assert "read-only" in str(info.value)
    async with ContextEngine(f"sqlite:///{sqlite_path}", settings=SETTINGS) as engine:
        assert await engine.get_session("b") is None
        a = await engine.get_session("a")
        assert a is not None and a.request_count == 0
        assert await engine.get_messages("a") == []


@pytest.fixture
def write_lock(sqlite_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the write lock of ``sqlite_path`` until told to stop."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            f"db = sqlite3.connect({str(sqlite_path)!r}, isolation_level=None)\n"
            "db.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "db.execute('ROLLBACK')\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    yield holder
    if holder.poll() is None:
        holder.communicate("\n", timeout=10)


def release(holder: subprocess.Popen[str]) -> None:
    holder.communicate("\n", timeout=10)
    assert holder.returncode == 0


async def test_a_lock_held_past_the_busy_timeout_is_a_retryable_timeout(
    sqlite_path: Path, write_lock: subprocess.Popen[str]
) -> None:
    """Waiting for another process's write lock longer than ``sqlite_busy_timeout``
    (each retry of a transient conflict waits again) is a StorageTimeoutError: the
    database is there, the wait ran out; retrying later may succeed."""
    settings = EngineSettings(
        auto_cleanup=False, auto_migrate=False, sqlite_busy_timeout=0.2, transient_retries=1
    )
    async with ContextEngine(f"sqlite:///{sqlite_path}", settings=settings) as engine:
        started = time.monotonic()
        with pytest.raises(StorageTimeoutError) as info:
            await engine.create_session("b", "u")
        assert time.monotonic() - started < 2
        ours(info.value)
        assert info.value.retryable is True
        assert "sqlite_busy_timeout (0.2 s)" in str(info.value)
        assert (await engine.health_check())["status"] == "healthy"  # reads need no lock

        release(write_lock)
        assert await engine.get_session("b") is None
        await engine.create_session("b", "u")  # the same engine writes again
        assert engine._store.connections_in_use() == 0


async def test_a_full_database_refuses_writes(sqlite_path: Path) -> None:
    """SQLite's page limit reached (``max_page_count`` at the current size): SQLITE_FULL
    through the real write path, as on a full disk."""
    with closing(sqlite3.connect(sqlite_path)) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    engine_ = create_async_engine(f"sqlite+aiosqlite:///{sqlite_path}")

    @event.listens_for(engine_.sync_engine, "connect")
    def _no_growth(dbapi_connection: Any, _record: object) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA max_page_count={pages}")
        cursor.close()

    try:
        async with ContextEngine(engine_, settings=SETTINGS) as engine:
            with pytest.raises(DatabaseFullError) as info:
                await engine.add_message("a", "user", "x" * 1_000_000)
            ours(info.value)
            assert info.value.retryable is False
            assert "full" in str(info.value)
            assert await engine.get_messages("a") == []
    finally:
        await engine_.dispose()


async def test_a_file_that_is_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "not-a.db"
    path.write_bytes(b"this is not an SQLite database, not even close" * 100)
    engine = ContextEngine(f"sqlite:///{path}", settings=EngineSettings(auto_cleanup=False))
    with pytest.raises(DatabaseUnavailableError) as info:
        await engine.initialize()
    ours(info.value)
    assert info.value.retryable is False
    assert "is not an SQLite database" in str(info.value)
