"""The statements a call hands to the database driver, captured for EXPLAIN.

Captured at the drivers' public surface, so that the benchmarks need nothing of the
engine's internals: on SQLite, ``sqlite3.Connection.set_trace_callback`` on every
connection the engine's pool opened (found through SQLAlchemy's class-level pool
``connect`` event, :func:`watch`), which reports each statement with its values
inlined, before it runs; on PostgreSQL, asyncpg's ``Connection.execute``/``fetch``
and ``PreparedStatement.fetch`` methods are wrapped while :func:`capture` is active
(each statement with its values, as it runs). Call :func:`watch` before the engine
opens.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
from asyncpg.prepared_stmt import PreparedStatement
from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry, Pool

#: The SQLite connections opened since :func:`watch` (sqlite3 connections take no
#: weak references; the benchmarks open a handful).
_sqlite: list[sqlite3.Connection] = []

#: A statement as the driver got it, and its values (none on SQLite: inlined).
Statement = tuple[str, list[Any]]


def _opened(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    driver = record.driver_connection
    if isinstance(driver, sqlite3.Connection):
        _sqlite.append(driver)


def watch() -> None:
    """Know every SQLite connection any SQLAlchemy pool opens from now on."""
    if not event.contains(Pool, "connect", _opened):
        event.listen(Pool, "connect", _opened)


#: asyncpg's methods that send a statement: (class, method, its SQL from self/args).
_ASYNCPG: list[tuple[type, str, Callable[[Any, tuple[Any, ...]], Statement]]] = [
    *[
        (asyncpg.Connection, name, lambda conn, args: (args[0], list(args[1:])))
        for name in ("execute", "fetch", "fetchrow", "fetchval")
    ],
    *[
        (PreparedStatement, name, lambda stmt, args: (stmt.get_query(), list(args)))
        for name in ("fetch", "fetchrow", "fetchval")
    ],
]


@contextmanager
def capture() -> Iterator[list[Statement]]:
    """The statements sent while the block runs, in order."""
    captured: list[Statement] = []

    def traced(sql: str) -> None:
        captured.append((sql, []))

    for conn in list(_sqlite):
        try:
            conn.set_trace_callback(traced)
        except sqlite3.ProgrammingError:  # closed
            _sqlite.remove(conn)

    originals = []
    for cls, name, statement in _ASYNCPG:
        original = getattr(cls, name)
        originals.append((cls, name, original))

        def recording(
            self: Any,
            *args: Any,
            _original: Any = original,
            _statement: Any = statement,
            **kwargs: Any,
        ) -> Any:
            captured.append(_statement(self, args))
            return _original(self, *args, **kwargs)

        setattr(cls, name, recording)
    try:
        yield captured
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
        for conn in list(_sqlite):
            try:
                conn.set_trace_callback(None)
            except sqlite3.ProgrammingError:
                _sqlite.remove(conn)
