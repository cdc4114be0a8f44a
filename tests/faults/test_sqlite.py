"""Real faults of SQLite: a read-only database, a write lock another process holds
past the busy timeout, a full database, a file that is not a database. Each call
fails with a StorageError subclass (never a raw sqlite3 error) and writes nothing."""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine import ContextEngine, EngineSettings, QuotaType
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    if os.geteuid() != 0:
        pytest.skip(
            "mounting a tmpfs needs root (CI runs as root); "
            "test_a_full_database_refuses_writes covers SQLITE_FULL by max_page_count"
        )
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        reason = f"cannot mount a tmpfs: {mount.stderr.strip() or mount.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the full-disk fault needs a tmpfs under CI (root): {reason}")
        pytest.skip(reason)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


async def fill(folder: Path) -> Path:
    """A file in ``folder`` grown until the disk is full, 16 KiB at a time, letting
    other tasks run between writes."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 16384)
                await asyncio.sleep(0)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_a_full_disk_refuses_writes_then_the_same_engine_writes_again(
    small_disk: Path,
) -> None:
    """A real full disk (a 2 MiB tmpfs) filled while 8 tasks write (session updates,
    usage, messages): every call either succeeds or raises DatabaseFullError (not
    retryable); nothing is half-written (in the database: the request counter equals
    the updates acknowledged, the quota counter the usage records, message sequences
    gapless and equal to the messages acknowledged); once space is freed, the same
    engine writes again."""
    path = small_disk / "full.db"
    url = f"sqlite:///{path}"
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("s", "u", tier="enterprise", idle_timeout=None)
        accepted: Counter[str] = Counter()
        full: Counter[str] = Counter()
        underway = asyncio.Event()  # set once the writers have written a little

        async def write(kind: str) -> None:
            if kind == "requests":
                await engine.update_session("s", increment_requests=True)
            elif kind == "usage":
                await engine.track_usage("s", "op", QuotaType.API_CALLS)
            else:
                await engine.add_message("s", "user", "m" * 200)

        async def writer(kind: str) -> None:
            stop = time.monotonic() + 30
            while full[kind] < 10:  # after the disk is full, ten failed calls each
                assert time.monotonic() < stop, f"no DatabaseFullError: {accepted}, {full}"
                try:
                    await write(kind)
                except DatabaseFullError as exc:  # anything else fails the test
                    ours(exc)
                    assert exc.retryable is False and "full" in str(exc)
                    full[kind] += 1
                else:
                    accepted[kind] += 1
                    if sum(accepted.values()) >= 30:
                        underway.set()
                await asyncio.sleep(0)

        async def filler() -> Path:
            await underway.wait()
            return await fill(small_disk)

        *_, filler_file = await asyncio.gather(
            *(writer(kind) for kind in ("requests", "usage", "messages") * 3), filler()
        )
        print(
            f"\nfull disk ({filler_file.stat().st_size // 1024} KiB filled while writing): "
            f"acknowledged {dict(accepted)}, refused {dict(full)}"
        )
        assert filler_file.stat().st_size > 0
        assert all(accepted[kind] > 0 for kind in ("requests", "usage", "messages"))
        check_database(path, accepted)  # reads work on a full disk
        assert engine._store.connections_in_use() == 0

        filler_file.unlink()  # space again: the same engine writes
        for kind in ("requests", "usage", "messages"):
            await write(kind)
            accepted[kind] += 1
        check_database(path, accepted)
        session = await engine.get_session("s")
        assert session is not None and session.request_count == accepted["requests"]
        assert len(await engine.get_messages("s", limit=None)) == accepted["messages"]


def check_database(path: Path, accepted: Counter[str]) -> None:
    """What the database holds is what was acknowledged, and consistent."""
    with closing(sqlite3.connect(path)) as db:
        requests = db.execute(
            "SELECT request_count FROM ctx_sessions WHERE session_id = 's'"
        ).fetchone()[0]
        used = db.execute(
            "SELECT used FROM ctx_quotas WHERE session_id = 's' AND resource_type = 'api_calls'"
        ).fetchone()[0]
        records = db.execute(
            "SELECT count(*) FROM ctx_usage_records WHERE session_id = 's'"
        ).fetchone()[0]
        count, first, last = db.execute(
            "SELECT count(*), min(seq), max(seq) FROM ctx_messages WHERE session_id = 's'"
        ).fetchone()
        next_seq, message_count = db.execute(
            "SELECT next_seq, message_count FROM ctx_chats WHERE session_id = 's'"
        ).fetchone()
    assert requests == accepted["requests"]
    assert used == records == accepted["usage"]
    assert count == accepted["messages"] == message_count == next_seq
    assert (first, last) == (1, count)  # gapless
