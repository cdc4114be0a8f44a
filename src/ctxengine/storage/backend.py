"""What differs between databases, as methods of one backend class per dialect."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from sqlalchemy import ColumnElement, Select, Table, and_, select
from sqlalchemy.engine import URL, CursorResult
from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.sql import Executable
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.selectable import FromClause
from sqlalchemy.types import TypeEngine

from ..errors import (
    ConnectionLostError,
    DatabaseUnavailableError,
    StorageError,
    StorageTimeoutError,
    ValidationError,
)
from ..models import Event
from ..settings import EngineSettings
from .connection import Connection, Params, Rows
from .prebuilt import run_portable
from .relay import EventRelay

log = logging.getLogger("ctxengine.storage")

T = TypeVar("T")

#: What "the database failed" looks like on every backend: SQLAlchemy's wrappers of
#: driver errors, and what can escape below it (pool timeouts, sockets). Each backend
#: adds its driver's own (:attr:`Backend.errors`). Any other SQLAlchemy error is a bug
#: of ours and is not disguised as a storage failure.
GENERIC_ERRORS: tuple[type[BaseException], ...] = (
    DBAPIError,
    DisconnectionError,
    PoolTimeoutError,
    OSError,
)


def _loads(document: str) -> Any:
    """``json.loads``, without parsing the empty documents most JSON columns hold."""
    if document == "{}":
        return {}
    if document == "[]":
        return []
    return json.loads(document)


def first_locked(
    found: Select[Any], where: Sequence[ColumnElement[bool]], order_by: Any, limit: int
) -> Select[Any]:
    """``found`` limited to its first ``limit`` rows where ``where`` holds, by
    ``order_by``, each locked as it is found (rows locked elsewhere are skipped)."""
    return found.where(*where).order_by(order_by).limit(limit).with_for_update(skip_locked=True)


def batch_document(rows: Sequence[Mapping[str, Any]]) -> str:
    """The value of a :meth:`Backend.batch_rows` parameter: ``rows`` as compact JSON
    (floats as their shortest exact repr, so they arrive unchanged)."""
    return json.dumps(rows, separators=(",", ":"), ensure_ascii=False)


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for a named lock."""
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


@dataclass(frozen=True, slots=True)
class VectorSearch:
    """What a database offers semantic search besides reading every vector of a scope:
    a cosine distance over the stored float32 blobs in SQL (sqlite-vec loaded), or
    pgvector's copy of each vector (``ctx_memories.embedding_vector``, migration 0011)
    with an HNSW index for some dimensions."""

    blob_distance: bool = False
    vector_column: bool = False
    indexed: frozenset[int] = frozenset()


#: Exact search only.
EXACT_ONLY = VectorSearch()


@dataclass(frozen=True, slots=True)
class Failure:
    """What a database error means: the :class:`StorageError` class to raise, why (for
    a person: what failed and what to do), whether retrying may help (None: the class's
    default), and the driver's own error that decided it."""

    kind: type[StorageError]
    reason: str
    retryable: bool | None = None
    cause: BaseException | None = None


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it wraps, outermost first: SQLAlchemy's ``orig`` (the
    DBAPI adapter's error), then each explicit ``__cause__`` (asyncpg's own error)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        wrapped = error.orig if isinstance(error, DBAPIError) else None
        error = wrapped if isinstance(wrapped, BaseException) else error.__cause__


class PortableConnection:
    """An AsyncConnection as the connection of a unit of work: everything runs
    through SQLAlchemy."""

    __slots__ = ("conn",)

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn

    async def run(
        self, statement: Executable, parameters: Params, as_dicts: bool = False, raw: bool = False
    ) -> Rows:
        return await run_portable(self.conn, statement, parameters, as_dicts, raw)

    async def execute(
        self, statement: Executable, parameters: Params | None = None
    ) -> CursorResult[*tuple[Any, ...]]:
        return await self.conn.execute(statement, parameters)

    async def run_sync(self, fn: Callable[[SyncConnection], T]) -> T:
        return await self.conn.run_sync(fn)


class Backend:
    """What differs between databases; one subclass per supported dialect.

    A backend is bound to the one AsyncEngine its store runs on (:meth:`bind`) and
    owns how units of work use it: which connections, which transactions
    (:meth:`unit_of_work`)."""

    name: ClassVar[str]
    #: Errors meaning the database or its driver failed (see :data:`GENERIC_ERRORS`).
    errors: ClassVar[tuple[type[BaseException], ...]] = GENERIC_ERRORS
    #: Whether write transactions exclude each other (a database-wide write lock), so
    #: that rows read in one cannot change before it commits.
    exclusive_writes: bool = False
    #: Whether INSERT … RETURNING may feed other INSERTs in one statement (WITH).
    data_modifying_ctes: bool = False
    #: Units of work a sweep with a backlog runs at once (their batches are disjoint:
    #: the rows of each are locked, and skipped by the others).
    sweep_workers: int = 1
    #: Seconds within which a call, its retries included, ends when the database does
    #: not answer (connect_timeout + statement_timeout); None: no bound. Set by bind.
    call_timeout: float | None = None
    #: The engine units of work run on, and whether the store created it (set by bind).
    engine: AsyncEngine
    owned: bool
    #: Set by dispose: no unit of work begins any more.
    closed: bool = False

    def __init__(self, url: URL) -> None:
        self.url = url

    @property
    def engine_url(self) -> URL:
        """The URL of the engines this backend creates (its driver may differ)."""
        return self.url

    def create_engine(self, settings: EngineSettings) -> AsyncEngine:
        """A new AsyncEngine for this backend's URL (bind it before use)."""
        return create_async_engine(
            self.engine_url, json_deserializer=_loads, **self.engine_options(settings)
        )

    def engine_options(self, settings: EngineSettings) -> dict[str, Any]:
        raise NotImplementedError

    def bind(self, engine: AsyncEngine, settings: EngineSettings, *, owned: bool) -> None:
        """Run units of work on ``engine`` from now on (``owned``: the store created
        it, and closes its pool), attaching connection-level setup (pragmas,
        functions, timeouts)."""
        self.engine = engine
        self.owned = owned

    async def unit_of_work(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        write: bool,
        one_statement: bool,
    ) -> T:
        """Run ``work`` in one transaction and commit it (see :meth:`Store.run
        <ctxengine.storage.Store.run>`). This portable one runs through SQLAlchemy;
        a backend whose driver allows less work per call has its own."""
        async with self.engine.connect() as conn:  # closes even if the caller is cancelled
            await self.begin(conn, write=write)
            try:
                result = await work(PortableConnection(conn))
            except BaseException:
                try:
                    await conn.rollback()
                except self.errors:  # the connection is gone; the pool discards it
                    log.debug("rollback failed", exc_info=True)
                raise
            await conn.commit()
            return result

    async def begin(self, conn: AsyncConnection, *, write: bool) -> None:
        """Open the transaction of a portable unit of work."""

    def connections_in_use(self) -> int:
        """Connections units of work running now have checked out of the pool."""
        return int(self.engine.sync_engine.pool.checkedout())  # type: ignore[attr-defined]

    async def dispose(self) -> None:
        """Begin no unit of work any more; close the pool if the store created it."""
        self.closed = True
        if self.owned:
            await self.engine.dispose()

    async def vector_search(self, conn: Connection) -> VectorSearch:
        """What this database offers semantic search now (exact only, here)."""
        return EXACT_ONLY

    async def lock(self, conn: Connection, name: str) -> None:
        """Hold a named lock until the transaction ends (mutual exclusion across processes)."""

    def locked(
        self, table: Table, where: Sequence[ColumnElement[bool]], order_by: Any, limit: int
    ) -> ColumnElement[bool]:
        """A condition, for an UPDATE of ``table``, matching the first ``limit`` rows
        where ``where`` holds in the order of ``order_by``, each locked as it is found
        and ``where`` checked again on the version locked; rows other transactions hold
        locked are skipped (SELECT … FOR UPDATE SKIP LOCKED)."""
        key = list(table.primary_key.columns)
        found = first_locked(select(*key), where, order_by, limit).subquery()
        return and_(*(column == found.c[column.key] for column in key))

    def _insert(self, table: Table) -> Any:
        """The dialect's INSERT construct (it has ``on_conflict_do_*`` and ``excluded``)."""
        raise NotImplementedError

    def insert_or_ignore(self, table: Table, key: Sequence[str]) -> Insert:
        """An INSERT that does nothing when a row with the same ``key`` columns exists."""
        stmt: Insert = self._insert(table).on_conflict_do_nothing(index_elements=list(key))
        return stmt

    def upsert(
        self,
        table: Table,
        key: Sequence[str],
        values: dict[str, Any] | Select[Any],
        update: Callable[[Any], dict[str, Any]],
        where: Callable[[Any], ColumnElement[bool]] | None = None,
    ) -> Insert:
        """INSERT ``values`` (or the rows of a SELECT whose columns are labelled with the
        table's); on a key conflict apply ``update(excluded)`` to the existing row, only
        where ``where(excluded)`` holds (then nothing is returned)."""
        stmt = self._insert(table)
        if isinstance(values, Select):
            stmt = stmt.from_select([c.key for c in values.selected_columns], values)
        else:
            stmt = stmt.values(**values)
        result: Insert = stmt.on_conflict_do_update(
            index_elements=list(key),
            set_=update(stmt.excluded),
            where=None if where is None else where(stmt.excluded),
        )
        return result

    def json_merge(self, column: ColumnElement[Any], patch: dict[str, Any]) -> ColumnElement[Any]:
        """``column`` with the top-level keys of ``patch`` set (a shallow merge)."""
        raise NotImplementedError

    def batch_rows(self, name: str, columns: Mapping[str, TypeEngine[Any]]) -> FromClause:
        """The rows of the bound parameter ``name`` as a table with ``columns``: the
        parameter is a JSON array of objects keyed by column (:func:`batch_document`),
        so one statement built once takes any number of rows (group commit)."""
        raise NotImplementedError

    def json_remove(self, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        """``column`` without the top-level ``key``."""
        raise NotImplementedError

    def json_contains_all(
        self, column: ColumnElement[Any], items: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        """True when the JSON array ``column`` holds every string of the JSON array
        ``items`` (a bound parameter of type ``JSONDocument``)."""
        raise NotImplementedError

    def event_relay(self, deliver: Callable[[Event], None]) -> EventRelay:
        """What carries events between engines on this database."""
        raise ValidationError(
            f"cross_process_events needs PostgreSQL (LISTEN/NOTIFY); {self.name} engines "
            "hear only their own events: turn the setting off",
            field="cross_process_events",
        )

    def is_transient(self, exc: BaseException) -> bool:
        """Whether retrying the whole transaction may succeed (lock conflicts, serialization)."""
        return False

    @property
    def where(self) -> str:
        """The database, for messages (no password)."""
        return self.url.render_as_string(hide_password=True)

    def classify(self, exc: BaseException) -> Failure:
        """What a database error (a driver's, possibly wrapped by SQLAlchemy) means.

        The dialect reads the most precise signal anywhere in the chain first (an
        SQLSTATE, an SQLite error code), innermost error first (the driver's own);
        then the generic ones (timeouts, refused or broken sockets, connections
        SQLAlchemy saw break). Anything else is a plain :class:`StorageError`,
        retryable when :meth:`is_transient` says so.
        """
        chain = list(error_chain(exc))
        chain.reverse()
        for read in (self._classify, self._classify_generic):
            for error in chain:
                failure = read(error)
                if failure is not None:
                    return failure
        transient = any(self.is_transient(error) for error in chain)
        return Failure(StorageError, "the database failed", transient, cause=chain[0])

    def _classify(self, error: BaseException) -> Failure | None:
        """The dialect's reading of one error of the chain (None: no opinion)."""
        return None

    def _classify_generic(self, error: BaseException) -> Failure | None:
        where = self.where
        if isinstance(error, PoolTimeoutError):
            return Failure(
                StorageTimeoutError,
                "no pooled connection came free within pool_timeout: retry, raise "
                "pool_size or max_overflow, or keep fewer calls in flight",
                cause=error,
            )
        if isinstance(error, TimeoutError):
            return Failure(
                StorageTimeoutError,
                f"{where} did not answer in time (connect_timeout, statement_timeout): retry",
                cause=error,
            )
        if isinstance(error, DisconnectionError) or (
            isinstance(error, DBAPIError) and error.connection_invalidated
        ):
            return Failure(
                ConnectionLostError,
                f"the connection to {where} broke: retry (the pool replaces it)",
                cause=error,
            )
        if isinstance(error, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
            return Failure(
                ConnectionLostError,
                f"the connection to {where} was closed: retry (the pool replaces it)",
                cause=error,
            )
        if isinstance(error, socket.gaierror):
            return Failure(
                DatabaseUnavailableError,
                f"cannot resolve the host of {where}: fix the host name in the URL",
                cause=error,
            )
        if isinstance(error, ConnectionRefusedError):
            return Failure(
                DatabaseUnavailableError,
                f"nothing accepts connections at {where}: start the server or fix the URL",
                cause=error,
            )
        if isinstance(error, OSError):
            return Failure(
                DatabaseUnavailableError,
                f"cannot reach {where}: check that it runs and is reachable from here",
                cause=error,
            )
        return None
