"""Statements of the hot paths, built once and run with the least work per call.

SQLAlchemy's per-execution work (cache key, parameter dictionary, execution context,
result object) takes about 80 µs, more than SQLite takes to run a small statement.
On an inline SQLite connection a prebuilt statement is therefore compiled once, by
SQLAlchemy, and run on the driver directly, its parameters and results converted by
the processors of the statement's own column types. Elsewhere it runs as any other.
"""

from __future__ import annotations

import sqlite3
import weakref
from collections import namedtuple
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import ReturnsRows

from .connection import Connection
from .sqlite import InlineConnection

Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]


class Record(Protocol):
    """A row, read by position or by column name (SQLAlchemy's Row is one)."""

    def __getitem__(self, index: int) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...

    def __len__(self) -> int: ...


class Rows(Protocol):
    """What the hot paths read from a result (SQLAlchemy's CursorResult has all of it)."""

    @property
    def rowcount(self) -> int: ...

    def first(self) -> Record | None: ...

    def scalar_one(self) -> Any: ...

    def scalar_one_or_none(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


async def run(conn: Connection, statement: Executable, parameters: Params) -> Rows:
    """Execute ``statement``, which must be built once (at import or per repository),
    never per call: the inline SQLite connection keeps its compiled form."""
    if type(conn) is InlineConnection:
        compiled = _COMPILED.get(statement)
        if compiled is None:
            compiled = _COMPILED[statement] = _Compiled(statement, conn.sync.dialect)
        raw = conn.sync.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        return compiled.run(raw, parameters)
    return await conn.execute(statement, parameters)


class _Compiled:
    """A statement compiled for the inline dialect (every engine's is configured alike)."""

    __slots__ = ("binds", "results", "row", "sql")

    def __init__(self, statement: Executable, dialect: Dialect) -> None:
        assert isinstance(statement, ClauseElement)
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql = compiled.string
        binds = compiled.binds
        #: (parameter name, value when the statement holds it, bind processor), in order
        self.binds = tuple(
            (
                name,
                None if binds[name].required else binds[name].effective_value,
                binds[name].type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name in compiled.positiontup or ()
        )
        columns: list[Any] = []
        if isinstance(statement, ReturnsRows):
            columns.extend(statement.exported_columns)
        self.results = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in columns
        )
        self.row = _row_type(tuple(column.key for column in columns))

    def values(self, parameters: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, held, process in self.binds:
            value = parameters[name] if name in parameters else held
            values.append(value if process is None else process(value))
        return values

    def run(self, raw: sqlite3.Connection, parameters: Params) -> _Result:
        if isinstance(parameters, Mapping):
            cursor = raw.execute(self.sql, self.values(parameters))
        else:
            cursor = raw.executemany(self.sql, [self.values(p) for p in parameters])
        try:
            if not self.results:
                return _Result([], cursor.rowcount)
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        make, processors = self.row._make, self.results
        rows = [
            make([v if p is None else p(v) for p, v in zip(processors, r, strict=True)])
            for r in fetched
        ]
        return _Result(rows, len(rows))


def _row_type(names: tuple[str, ...]) -> Any:
    """Rows read by position, attribute (as SQLAlchemy's) or ``_mapping``."""

    def mapping(row: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(names, row, strict=True))

    base = _namedtuple("Row", names, rename=True)
    return type("Row", (base,), {"__slots__": (), "_mapping": property(mapping)})


class _Result:
    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def scalar_one(self) -> Any:
        (row,) = self.rows
        return row[0]

    def scalar_one_or_none(self) -> Any:
        if not self.rows:
            return None
        return self.scalar_one()

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


_namedtuple: Any = namedtuple
_COMPILED: weakref.WeakKeyDictionary[Executable, _Compiled] = weakref.WeakKeyDictionary()
