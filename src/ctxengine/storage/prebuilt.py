"""Statements of the hot paths, built once and run with the least work per call.

SQLAlchemy's per-execution work (cache key, parameter dictionary, execution context,
result object) takes about 80 µs, more than SQLite takes to run a small statement.
So a statement built once is compiled once, by SQLAlchemy (:func:`compiled`), with
the processors of its own column types for its parameters and results; the
connection kinds of the backends whose driver can run it directly (inline sqlite3,
asyncpg) do, each in its ``run``; elsewhere it runs through SQLAlchemy
(:func:`run_portable`).
"""

from __future__ import annotations

import weakref
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import ReturnsRows

from .connection import Connection, Params, Record, Rows

__all__ = [
    "Compiled",
    "Converters",
    "Params",
    "Record",
    "Result",
    "Rows",
    "compiled",
    "run",
    "run_dicts",
    "run_portable",
    "run_raw",
    "shape",
]


async def run(conn: Connection, statement: Executable, parameters: Params) -> Rows:
    """Execute ``statement``, which must be built once (at import or per repository),
    never per call: its compiled form is kept."""
    return await conn.run(statement, parameters)


async def run_dicts(
    conn: Connection, statement: Executable, parameters: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The rows of ``statement`` (built once, as for :func:`run`) as dicts keyed by
    column: the ``__dict__`` of a model whose fields the columns are, with no
    intermediate row object."""
    return list(await conn.run(statement, parameters, as_dicts=True))


async def run_raw(
    conn: Connection, statement: Executable, parameters: Mapping[str, Any]
) -> list[Sequence[Any]]:
    """The rows of ``statement`` (built once, as for :func:`run`) as plain sequences
    read by position: the driver's own rows (sqlite3's tuples, asyncpg's records) when
    none of its columns needs converting, with no object of ours per row; for reads
    of many rows (the vectors of a search)."""
    return list(await conn.run(statement, parameters, raw=True))


async def run_portable(
    conn: AsyncConnection,
    statement: Executable,
    parameters: Params,
    as_dicts: bool,
    raw: bool = False,
) -> Rows:
    """``statement`` run through SQLAlchemy (where no driver runs it directly); its
    rows are plain sequences already, so ``raw`` changes nothing."""
    result = await conn.execute(statement, parameters)
    if raw or not as_dicts:
        return result
    return Result([dict(row._mapping) for row in result], result.rowcount)


def compiled(statement: Executable, dialect: Dialect) -> Compiled:
    """``statement`` compiled for ``dialect``, once (kept while the statement lives)."""
    forms = _COMPILED.get(statement)
    if forms is None:
        forms = _COMPILED[statement] = {}
    # engines of one driver compile alike (an engine passed in with its own JSON
    # serializer gets the first engine's, which only changes the stored formatting)
    key = (dialect.name, dialect.driver)
    form = forms.get(key)
    if form is None:
        form = forms[key] = Compiled(statement, dialect)
    return form


class Compiled:
    """A statement compiled for one dialect, with the processors of its values."""

    __slots__ = ("binds", "converters", "dialect", "keys", "row", "sql", "types")

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
                _REQUIRED if binds[name].required else binds[name].effective_value,
                binds[name].type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name in compiled.positiontup or ()
        )
        columns: list[Any] = []
        if isinstance(statement, ReturnsRows):
            columns.extend(statement.exported_columns)
        self.dialect = dialect
        self.types = [column.type.dialect_impl(dialect) for column in columns]
        self.keys = tuple(column.key for column in columns)
        self.row = _row_type(self.keys)
        #: (to a Row, to a dict, to a plain tuple or None when the driver's row will do)
        #: for one driver row, made once the driver's column types are known
        self.converters: Converters | None = None

    def converters_for(self, coltypes: Sequence[Any]) -> Converters:
        """(to a Row, to a dict, to a tuple: None when no column needs a processor) for
        one driver row, by the result processors of the statement's column types for
        the driver's column types; index it by :func:`shape`."""
        if self.converters is None:
            processors = [
                t.result_processor(self.dialect, coltype)
                for t, coltype in zip(self.types, coltypes, strict=True)
            ]
            plain = None
            if any(p is not None for p in processors):
                plain = _converter(self.keys, processors, tuple)
            self.converters = (
                _converter(self.keys, processors, self.row),
                _converter(self.keys, processors, None),
                plain,
            )
        return self.converters

    def values(self, parameters: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, held, process in self.binds:
            value = parameters.get(name, held)
            if value is _REQUIRED:
                raise KeyError(f"no value for the parameter {name!r} of {self.sql!r}")
            values.append(value if process is None else process(value))
        return values


_Convert = Callable[[Sequence[Any]], Any]
#: See :meth:`Compiled.converters_for`.
Converters = tuple[_Convert, _Convert, _Convert | None]


def shape(as_dicts: bool, raw: bool) -> int:
    """The index in :data:`Converters` of the rows a run asked for."""
    return 2 if raw else int(as_dicts)


def _converter(keys: tuple[str, ...], processors: Sequence[Any], row: Any) -> _Convert:
    """One function turning a driver row into a ``row`` (or a dict keyed by column when
    ``row`` is None), its values through their processors (None: as they are).

    It is generated as one expression, as ``namedtuple`` generates its methods: a
    loop over the columns of each row cost more than the conversion itself (1000
    message rows: 1.2 ms looping, 0.5 ms generated)."""
    values = [f"r[{i}]" if p is None else f"p{i}(r[{i}])" for i, p in enumerate(processors)]
    if row is None:
        items = (f"{key!r}: {value}" for key, value in zip(keys, values, strict=True))
        body = "{" + ", ".join(items) + "}"
    else:
        body = f"new(row, ({', '.join(values)},))"
    scope = {f"p{i}": p for i, p in enumerate(processors) if p is not None}
    scope |= {"new": tuple.__new__, "row": row}
    convert: _Convert = eval(f"lambda r: {body}", scope)
    return convert


def _row_type(names: tuple[str, ...]) -> Any:
    """Rows read by position, attribute (as SQLAlchemy's) or ``_mapping``."""

    def mapping(row: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(names, row, strict=True))

    base = _namedtuple("Row", names, rename=True)
    return type("Row", (base,), {"__slots__": (), "_mapping": property(mapping)})


class Result:
    """Rows a driver returned, converted (see :meth:`Compiled.converters_for`)."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    @classmethod
    def of(cls, fetched: Iterable[Sequence[Any]], convert: _Convert | None) -> Result:
        """``fetched`` converted row by row (None: the rows as they are)."""
        rows = list(fetched) if convert is None else list(map(convert, fetched))
        return cls(rows, len(rows))

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
#: Held by a parameter that each execution must give.
_REQUIRED = object()
#: Compiled forms of each statement, by dialect.
_COMPILED: weakref.WeakKeyDictionary[Executable, dict[tuple[str, str], Compiled]] = (
    weakref.WeakKeyDictionary()
)
