"""How a backend classifies driver errors that no test here can cause for real (a full
disk on the server, a server starting up, a crash): the table, read from the error
as SQLAlchemy hands it over (wrapped, the driver's own error as the cause)."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ctxengine.errors import (
    ConnectionLostError,
    DatabaseFullError,
    DatabaseUnavailableError,
    StorageError,
    StorageTimeoutError,
)
from ctxengine.storage.backend import Backend
from ctxengine.storage.postgres import PostgresBackend
from ctxengine.storage.sqlite import SQLiteBackend

PG = PostgresBackend(make_url("postgresql+asyncpg://alice@db.example:5433/ctx"))
LITE = SQLiteBackend(make_url("sqlite+aiosqlite:////srv/ctx.db"))


def wrapped(driver_error: BaseException) -> DBAPIError:
    """``driver_error`` as SQLAlchemy raises it: a DBAPIError around the adapter's error,
    whose cause is the driver's."""
    adapter = Exception(str(driver_error))
    adapter.__cause__ = driver_error
    return DBAPIError("SELECT 1", None, adapter)


def sqlite_error(code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError("failed")
    error.sqlite_errorcode = code
    return error


@pytest.mark.parametrize(
    ("backend", "error", "kind", "retryable", "text"),
    [
        (PG, asyncpg.exceptions.DiskFullError("no space"), DatabaseFullError, False, "full"),
        (
            PG,
            asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
            DatabaseUnavailableError,
            True,
            "db.example:5433 is starting up",
        ),
        (
            PG,
            asyncpg.exceptions.DatabaseDroppedError("dropped"),
            DatabaseUnavailableError,
            False,
            "database 'ctx'",
        ),
        (PG, asyncpg.exceptions.CrashShutdownError("crash"), ConnectionLostError, True, "crash"),
        (
            PG,
            asyncpg.exceptions.ConnectionFailureError("gone"),
            ConnectionLostError,
            True,
            "broke",
        ),
        (
            PG,
            asyncpg.exceptions.QueryCanceledError("statement timeout"),
            StorageTimeoutError,
            True,
            "statement_timeout",
        ),
        (PG, asyncpg.exceptions.OutOfMemoryError("oom"), StorageError, True, "resources"),
        (PG, asyncpg.exceptions.SerializationError("conflict"), StorageError, True, "failed"),
        (PG, asyncpg.exceptions.UniqueViolationError("dup"), StorageError, False, "failed"),
        (
            PG,
            asyncpg.InterfaceError("another operation is in progress"),
            ConnectionLostError,
            True,
            "no longer usable",
        ),
        (PG, ConnectionRefusedError(), DatabaseUnavailableError, True, "nothing accepts"),
        (PG, ConnectionResetError(), ConnectionLostError, True, "was closed"),
        (PG, TimeoutError(), StorageTimeoutError, True, "did not answer in time"),
        (PG, PoolTimeoutError(), StorageTimeoutError, True, "pool_timeout"),
        (LITE, sqlite_error(sqlite3.SQLITE_FULL), DatabaseFullError, False, "/srv/ctx.db"),
        (LITE, sqlite_error(sqlite3.SQLITE_IOERR | 13 << 8), StorageError, False, "I/O"),
        (LITE, sqlite_error(sqlite3.SQLITE_LOCKED), StorageTimeoutError, True, "locked"),
        (
            LITE,
            sqlite_error(sqlite3.SQLITE_CANTOPEN),
            DatabaseUnavailableError,
            False,
            "cannot open /srv/ctx.db",
        ),
    ],
)
def test_classify(
    backend: Backend,
    error: BaseException,
    kind: type[StorageError],
    retryable: bool,
    text: str,
) -> None:
    for raised in (error, wrapped(error)):
        failure = backend.classify(raised)
        assert failure.kind is kind, (raised, failure)
        assert (kind.default_retryable if failure.retryable is None else failure.retryable) is (
            retryable
        )
        assert text in failure.reason
        assert failure.cause is error  # the driver's own error, however deep


def test_an_error_constructed_as_before_keeps_its_defaults() -> None:
    error = StorageError("it failed", operation="connect")
    assert (error.operation, error.retryable, error.cause) == ("connect", False, None)
    assert DatabaseUnavailableError("down").retryable is True
    assert DatabaseUnavailableError("gone", retryable=False).retryable is False
