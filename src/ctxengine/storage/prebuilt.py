"""Statements of the hot paths, built once and run with the least work per call.

SQLAlchemy's per-execution work (cache key, parameter dictionary, execution context,
result object) takes about 80 µs, more than SQLite takes to run a small statement.
On an inline SQLite connection, and on an asyncpg connection that SQLAlchemy sees in
autocommit (a transaction, when a unit of work needs one, is the driver's own: see
``Store``), a prebuilt statement is therefore compiled once, by SQLAlchemy, and run on
the driver directly, its parameters and results converted by the processors of the
statement's own column types. Elsewhere it runs as any other.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.engine import CursorResult, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import PoolProxiedConnection, QueuePool
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.selectable import ReturnsRows
from sqlalchemy.util.concurrency import greenlet_spawn

from .connection import Connection
from .postgres import IDLE_SINCE, PING_AFTER_IDLE
from .sqlite import InlineConnection

T = TypeVar("T")
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]


class Record(Protocol):
    """A row, read by position or by column name (SQLAlchemy's Row is one)."""

    def __getitem__(self, index: int) -> Any: ...

    def __getattr__(self, name: str) -> Any: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


class Rows(Protocol):
    """What the hot paths read from a result (SQLAlchemy's CursorResult has all of it)."""

    @property
    def rowcount(self) -> int: ...

    def first(self) -> Record | None: ...

    def scalar_one(self) -> Any: ...

    def scalar_one_or_none(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


class HeldConnections:
    """The pool entries units of work on asyncpg take and return.

    A checkout from SQLAlchemy's async pool and its return cost about 90 µs of CPU
    (two greenlet spawns, the pool's events and queue): 40 % of update_session's
    client CPU from 16 tasks. So a unit returns its entry here, still checked out,
    and the next unit takes the one returned last (the pool's own LIFO order) for
    the cost of a list pop. The pool stays in charge of its connections: an entry
    goes back to it when it has been out for :data:`~.postgres.PING_AFTER_IDLE`
    seconds (the pool then pings it if it was idle that long, and recycles it when
    old), when its connection is closed, when a unit waits for the pool, and when
    the pool has opened connections above ``pool_size`` (it closes those on return).
    Only an engine the store owns holds entries: another user of a shared pool would
    wait for connections held here.
    """

    __slots__ = ("_adopting", "_idle", "_pool", "_view", "_waiting")

    def __init__(self, view: AsyncEngine, *, hold: bool) -> None:
        #: the engine in autocommit the entries are checked out from
        self._view = view
        pool = view.sync_engine.pool
        self._pool = pool if hold and isinstance(pool, QueuePool) else None
        self._idle: list[PoolProxiedConnection] = []
        #: units waiting for the pool: returned entries go to the pool, not here
        self._waiting = 0
        #: checkouts whose unit was cancelled meanwhile (see ``_checkout``)
        self._adopting: set[asyncio.Future[Any]] = set()

    @property
    def held(self) -> int:
        """Idle entries held checked out."""
        return len(self._idle)

    async def checkout(self) -> AutocommitConnection:
        idle = self._idle
        while idle:
            entry = idle.pop()
            if (
                time.monotonic() - entry.info[_TAKEN] < PING_AFTER_IDLE
                and not entry.driver_connection.is_closed()  # type: ignore[union-attr]
            ):
                return AutocommitConnection(self, entry)
            await self.finish(entry.close)  # the pool pings, replaces or recycles it
        self._waiting += 1
        try:
            entry = await self._checkout()
        finally:
            self._waiting -= 1
        entry.info[_TAKEN] = time.monotonic()
        return AutocommitConnection(self, entry)

    async def _checkout(self) -> PoolProxiedConnection:
        """An entry from the pool, which may connect or wait for a connection (both need
        a greenlet). A unit cancelled meanwhile gets its CancelledError at once, but the
        checkout goes on: interrupted, asyncpg's connect leaves a future whose error
        nobody retrieves (printed), and the connection made is wasted. The entry it
        gives is held here as any returned one."""
        checkout = asyncio.ensure_future(greenlet_spawn(self._view.sync_engine.raw_connection))
        try:
            return await asyncio.shield(checkout)
        except asyncio.CancelledError:
            self._adopting.add(checkout)
            checkout.add_done_callback(self._adopt)
            raise

    def _adopt(self, checkout: asyncio.Future[PoolProxiedConnection]) -> None:
        self._adopting.discard(checkout)
        if checkout.cancelled() or checkout.exception() is not None:
            return  # nothing was checked out (the error is the unit's no more)
        entry = checkout.result()
        entry.info[_TAKEN] = time.monotonic()
        returned = asyncio.ensure_future(self.checkin(entry))
        self._adopting.add(returned)
        returned.add_done_callback(self._adopting.discard)

    async def checkin(self, entry: PoolProxiedConnection) -> None:
        pool = self._pool
        if pool is not None and not self._waiting and pool.overflow() <= 0:
            entry.info[IDLE_SINCE] = time.monotonic()
            self._idle.append(entry)
        else:
            await self.finish(entry.close)

    async def finish(self, call: Callable[[], object]) -> None:
        """Run the pool's ``call`` (a return, an invalidation: it may suspend) to its end
        even if the unit is cancelled meanwhile, which gets its CancelledError at once:
        interrupted, the pool logs an error and closes nothing."""
        done = asyncio.ensure_future(greenlet_spawn(call))
        self._adopting.add(done)
        done.add_done_callback(self._adopting.discard)
        await asyncio.shield(done)

    async def close(self) -> None:
        """Return every entry to the pool and hold none from now on."""
        self._pool = None
        while self._idle:
            await greenlet_spawn(self._idle.pop().close)


class AutocommitConnection:
    """A pooled asyncpg connection as the connection of a unit of work: prebuilt
    statements run on the driver (inside a transaction of the driver's own when the
    unit writes), others through an AsyncConnection in autocommit, made on first use.

    Most units run prebuilt statements only, and need no AsyncConnection (whose
    checkout costs 59 µs against the bare pool entry's 14 µs, measured).
    """

    __slots__ = ("_conn", "_held", "_returned", "dialect", "driver", "entry")

    def __init__(self, held: HeldConnections, entry: PoolProxiedConnection) -> None:
        self._held = held
        self._conn: AsyncConnection | None = None
        self._returned = False
        self.entry = entry
        self.dialect = held._view.dialect
        self.driver: Any = entry.driver_connection

    async def _connection(self) -> AsyncConnection:
        if self._conn is None:
            view = self._held._view
            sync = await greenlet_spawn(SyncConnection, view.sync_engine, self.entry)
            self._conn = AsyncConnection(view, sync)
        return self._conn

    async def execute(
        self,
        statement: Executable,
        parameters: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    ) -> CursorResult[*tuple[Any, ...]]:
        return await (await self._connection()).execute(statement, parameters)

    async def run_sync(self, fn: Callable[[SyncConnection], T]) -> T:
        return await (await self._connection()).run_sync(fn)

    async def invalidate(self) -> None:
        """Discard the connection at once (no goodbye to a server that may not answer):
        the pool replaces it."""
        self.driver.terminate()
        if self._conn is not None:
            await self._conn.invalidate()
        elif not self._returned:
            self._returned = True
            await self._held.finish(self.entry.invalidate)  # it returns the entry too

    async def close(self) -> None:
        """Return the connection (once): to the pool when an AsyncConnection was made
        on it, else to the held entries."""
        if self._conn is not None:
            await self._conn.close()
        elif not self._returned:
            self._returned = True
            await self._held.checkin(self.entry)


async def run(conn: Connection, statement: Executable, parameters: Params) -> Rows:
    """Execute ``statement``, which must be built once (at import or per repository),
    never per call: its compiled form is kept."""
    ran = await _run(conn, statement, parameters, as_dicts=False)
    return ran if ran is not None else await conn.execute(statement, parameters)


async def run_dicts(
    conn: Connection, statement: Executable, parameters: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The rows of ``statement`` (built once, as for :func:`run`) as dicts keyed by
    column: the ``__dict__`` of a model whose fields the columns are, with no
    intermediate row object."""
    ran = await _run(conn, statement, parameters, as_dicts=True)
    if ran is not None:
        return ran.rows
    return [dict(row._mapping) for row in await conn.execute(statement, parameters)]


async def _run(
    conn: Connection, statement: Executable, parameters: Params, *, as_dicts: bool
) -> _Result | None:
    """Run on the driver directly where the connection allows it; None elsewhere."""
    kind = type(conn)
    if kind is InlineConnection:
        assert isinstance(conn, InlineConnection)
        raw = conn.sync.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        return _compiled(statement, conn.sync.dialect).run_sqlite(raw, parameters, as_dicts)
    if kind is AutocommitConnection:
        assert isinstance(conn, AutocommitConnection)
        form = _compiled(statement, conn.dialect)
        if isinstance(parameters, Mapping):
            return await form.run_asyncpg(conn.driver, parameters, as_dicts)
        if not form.types:  # rows of parameters for a statement returning nothing
            await conn.driver.executemany(form.sql, [form.values(p) for p in parameters])
            return _Result([], -1)
    return None


def _compiled(statement: Executable, dialect: Dialect) -> _Compiled:
    forms = _COMPILED.get(statement)
    if forms is None:
        forms = _COMPILED[statement] = {}
    # engines of one driver compile alike (an engine passed in with its own JSON
    # serializer gets the first engine's, which only changes the stored formatting)
    key = (dialect.name, dialect.driver)
    form = forms.get(key)
    if form is None:
        form = forms[key] = _Compiled(statement, dialect)
    return form


class _Compiled:
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
        #: (to a Row, to a dict) for one driver row, made once the driver's column types
        #: are known
        self.converters: tuple[_Convert, _Convert] | None = None

    def converters_for(self, coltypes: Sequence[Any]) -> tuple[_Convert, _Convert]:
        """(to a Row, to a dict) for one driver row, by the result processors of the
        statement's column types for the driver's column types."""
        if self.converters is None:
            processors = [
                t.result_processor(self.dialect, coltype)
                for t, coltype in zip(self.types, coltypes, strict=True)
            ]
            self.converters = (
                _converter(self.keys, processors, self.row),
                _converter(self.keys, processors, None),
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

    def run_sqlite(
        self, raw: sqlite3.Connection, parameters: Params, as_dicts: bool = False
    ) -> _Result:
        if isinstance(parameters, Mapping):
            cursor = raw.execute(self.sql, self.values(parameters))
        else:
            cursor = raw.executemany(self.sql, [self.values(p) for p in parameters])
        try:
            if not self.types:
                return _Result([], cursor.rowcount)
            converters = self.converters_for([None] * len(self.types))
            return _Result.of(cursor, converters[as_dicts])  # row by row, as read
        finally:
            cursor.close()

    async def run_asyncpg(
        self, driver: Any, parameters: Mapping[str, Any], as_dicts: bool = False
    ) -> _Result:
        values = self.values(parameters)
        if not self.types:
            status = await driver.execute(self.sql, *values)
            count = status.rsplit(" ", 1)[-1]
            return _Result([], int(count) if count.isdigit() else -1)
        converters = self.converters
        if converters is None:  # the driver's column types (OIDs), as SQLAlchemy reads them
            prepared = await driver.prepare(self.sql)
            converters = self.converters_for([a.type.oid for a in prepared.get_attributes()])
        return _Result.of(await driver.fetch(self.sql, *values), converters[as_dicts])


_Convert = Callable[[Sequence[Any]], Any]


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


class _Result:
    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    @classmethod
    def of(cls, fetched: Iterable[Sequence[Any]], convert: _Convert) -> _Result:
        rows = list(map(convert, fetched))
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
#: When a held entry was taken from the pool (its ``info``).
_TAKEN = "ctxengine_taken"
#: Held by a parameter that each execution must give.
_REQUIRED = object()
#: Compiled forms of each statement, by dialect.
_COMPILED: weakref.WeakKeyDictionary[Executable, dict[tuple[str, str], _Compiled]] = (
    weakref.WeakKeyDictionary()
)
