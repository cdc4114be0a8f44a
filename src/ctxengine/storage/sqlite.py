"""SQLite: WAL, BEGIN IMMEDIATE for writes, Python JSON helpers, statements run inline.

SQLite is a library, not a server: a statement on a page-cached database takes
microseconds, less than handing it to a worker thread and back (aiosqlite hops threads
several times per statement). Engines created by ctxengine therefore run SQLite
statements directly on the event loop thread, with the busy timeout at zero so none
of them can wait for a lock there; the only wait, taking the write lock while another
process holds it, happens in a worker thread (:meth:`SQLiteBackend.begin_inline`). An
AsyncEngine given by the caller (aiosqlite) is used as it is.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Table,
    Text,
    bindparam,
    event,
    func,
    literal,
    select,
    type_coerce,
)
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import URL, Connection, CursorResult
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool, Pool, StaticPool
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import FromClause
from sqlalchemy.types import TypeEngine
from sqlalchemy.util.concurrency import greenlet_spawn, in_greenlet

from ..errors import (
    DatabaseFullError,
    DatabaseUnavailableError,
    EngineClosedError,
    ReadOnlyDatabaseError,
    StorageError,
    StorageTimeoutError,
)
from ..settings import EngineSettings
from .backend import EXACT_ONLY, GENERIC_ERRORS, Backend, Failure, VectorSearch
from .connection import Connection as UnitConnection
from .connection import Params, Rows
from .prebuilt import Result, compiled, shape

try:
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

log = logging.getLogger("ctxengine.storage")

T = TypeVar("T")

#: The URL driver name of the inline dialect.
INLINE_DRIVER = "sqlite+ctxengine"


def _discard(conn: Connection) -> None:
    """Roll back what a unit of work began and return its connection to the pool
    (on the loop thread, as pool returns are; never suspends)."""
    try:
        conn.rollback()
    except sqlite3.Error:  # the connection is unusable: the pool discards it
        log.debug("rollback failed", exc_info=True)
    finally:
        conn.close()


class InlineSQLiteDialect(SQLiteDialect_pysqlite):
    """The standard library's sqlite3, run on the calling (event loop) thread.

    Declared async so SQLAlchemy's asyncio layer accepts it: its calls never
    suspend, so each completes without a trip through the event loop.
    """

    driver = "ctxengine"
    is_async = True
    runs_inline = True
    supports_statement_cache = True

    @classmethod
    def get_pool_class(cls, url: URL) -> type[Pool]:
        return AsyncAdaptedQueuePool if cls._is_url_file_db(url) else StaticPool

    # Units of work run statements on a sync Connection (see InlineConnection). Through
    # an AsyncConnection (migrations, a caller's own use of the engine), SQLAlchemy
    # checks that executing awaited something: a finished coroutine satisfies it.
    def do_execute(self, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> None:
        if in_greenlet():
            await_(_nothing())
        cursor.execute(statement, parameters)

    def do_execute_no_params(self, cursor: Any, statement: Any, context: Any = None) -> None:
        if in_greenlet():
            await_(_nothing())
        cursor.execute(statement)

    def do_executemany(
        self, cursor: Any, statement: Any, parameters: Any, context: Any = None
    ) -> None:
        if in_greenlet():
            await_(_nothing())
        cursor.executemany(statement, parameters)


async def _nothing() -> None:
    return None


class _Cursor(sqlite3.Cursor):
    async def _async_soft_close(self) -> None:
        """Called by SQLAlchemy's asyncio layer once a result is handed over; this
        cursor is read on the same thread, on demand, so there is nothing to do."""


class _Connection(sqlite3.Connection):
    def cursor(self, factory: Any = _Cursor) -> Any:
        return super().cursor(factory)


registry.register("sqlite.ctxengine", __name__, "InlineSQLiteDialect")


class InlineConnection:
    """The connection of a unit of work on the inline dialect: statements run on a
    pooled sync Connection directly, without a hop through a greenlet per call."""

    __slots__ = ("sync",)

    def __init__(self, sync: Connection) -> None:
        self.sync = sync

    async def run(
        self, statement: Executable, parameters: Params, as_dicts: bool = False, raw: bool = False
    ) -> Rows:
        driver = self.sync.connection.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        form = compiled(statement, self.sync.dialect)
        if isinstance(parameters, Mapping):
            cursor = driver.execute(form.sql, form.values(parameters))
        else:
            cursor = driver.executemany(form.sql, [form.values(p) for p in parameters])
        try:
            if not form.types:
                return Result([], cursor.rowcount)
            converters = form.converters_for([None] * len(form.types))
            convert = converters[shape(as_dicts, raw)]
            return Result.of(cursor.fetchall() if convert is None else cursor, convert)
        finally:
            cursor.close()

    async def execute(
        self, statement: Executable, parameters: Params | None = None
    ) -> CursorResult[*tuple[Any, ...]]:
        return self.sync.execute(statement, parameters)

    async def run_sync(self, fn: Callable[[Connection], T]) -> T:
        return fn(self.sync)


def _vector_extension() -> str | None:
    """The path of sqlite-vec's loadable extension (the extra ``vector``), or None when
    it is not installed or this Python's sqlite3 cannot load extensions (a build
    without ``--enable-loadable-sqlite-extensions``)."""
    if not hasattr(sqlite3.Connection, "enable_load_extension"):
        return None
    try:
        import sqlite_vec
    except ImportError:
        return None
    path: str = sqlite_vec.loadable_path()
    return path


#: Bytes of the database file read through memory mapping where sqlite-vec is loaded.
VECTOR_MMAP_SIZE = 1 << 30
#: sqlite-vec loaded: SQL computes cosine distances over the stored blobs.
VECTOR_FUNCTIONS = VectorSearch(blob_distance=True)


def _json_contains_all(array: str | None, wanted: str) -> int:
    have = set(json.loads(array)) if array else set()
    return int(have.issuperset(json.loads(wanted)))


def _json_merge(target: str | None, patch: str) -> str:
    merged = json.loads(target) if target else {}
    merged.update(json.loads(patch))
    return json.dumps(merged, separators=(",", ":"), ensure_ascii=False)


def _json_remove(target: str | None, key: str) -> str:
    document = json.loads(target) if target else {}
    document.pop(key, None)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False)


#: What an SQLite primary result code means: the error to raise, the reason (formatted
#: with ``where`` and ``busy``, in seconds), whether retrying may help.
_FAILURES: dict[int, tuple[type[StorageError], str, bool]] = {
    sqlite3.SQLITE_BUSY: (
        StorageTimeoutError,
        "{where} stayed locked by another connection or process for longer than "
        "sqlite_busy_timeout ({busy:g} s): retry, or raise sqlite_busy_timeout",
        True,
    ),
    sqlite3.SQLITE_LOCKED: (
        StorageTimeoutError,
        "a table of {where} is locked by another connection of this process: retry",
        True,
    ),
    sqlite3.SQLITE_READONLY: (
        ReadOnlyDatabaseError,
        "{where} is read-only (file or folder permissions, a read-only mount, or "
        "mode=ro in the URL): open it writable",
        False,
    ),
    sqlite3.SQLITE_FULL: (
        DatabaseFullError,
        "the disk holding {where} is full (or its max_page_count is reached): free space",
        False,
    ),
    sqlite3.SQLITE_CANTOPEN: (
        DatabaseUnavailableError,
        "cannot open {where}: check the path and the permissions of the file, its "
        "folder and its -wal and -shm files",
        False,
    ),
    sqlite3.SQLITE_PERM: (
        DatabaseUnavailableError,
        "access to {where} is denied: check the permissions of the file and its folder",
        False,
    ),
    sqlite3.SQLITE_NOTADB: (
        DatabaseUnavailableError,
        "{where} is not an SQLite database: fix the path in the URL",
        False,
    ),
    sqlite3.SQLITE_CORRUPT: (StorageError, "{where} is corrupt: restore it from a backup", False),
    sqlite3.SQLITE_IOERR: (StorageError, "a disk I/O error on {where}: check the disk", False),
}


class SQLiteBackend(Backend):
    """Units of work on the engines it creates run inline (see the module's doc); on
    an aiosqlite engine given by the caller, through SQLAlchemy. Writers take the
    write lock up front (BEGIN IMMEDIATE); reads run in autocommit, each statement
    seeing a consistent snapshot of its own, with no BEGIN/COMMIT."""

    name = "sqlite"
    errors = (*GENERIC_ERRORS, sqlite3.Error)
    exclusive_writes = True  # BEGIN IMMEDIATE takes the database's write lock

    @property
    def in_memory(self) -> bool:
        return self.url.database in (None, "", ":memory:")

    #: How long the lock-taking BEGIN waits (set from the settings by ``prepare``).
    _busy_ms = 30_000

    @property
    def engine_url(self) -> URL:
        return self.url.set(drivername=INLINE_DRIVER)

    def engine_options(self, settings: EngineSettings) -> dict[str, Any]:
        # the lock-taking BEGIN moves a connection to a worker thread and back
        connect_args = {
            "factory": _Connection,
            "check_same_thread": False,
            "timeout": settings.sqlite_busy_timeout,
        }
        if self.in_memory:
            return {"poolclass": StaticPool, "connect_args": connect_args}
        # Units of work check connections out without suspending: the pool must never
        # make them wait (only units waiting for another process's lock hold extras).
        return {"pool_size": settings.pool_size, "max_overflow": -1, "connect_args": connect_args}

    def bind(self, engine: AsyncEngine, settings: EngineSettings, *, owned: bool) -> None:
        super().bind(engine, settings, owned=owned)
        self._check_folder()
        busy_ms = self._busy_ms = int(settings.sqlite_busy_timeout * 1000)
        in_memory = self.in_memory
        inline = self._inline = isinstance(engine.dialect, InlineSQLiteDialect)
        #: the in-memory database is one shared connection: its units take turns
        self._serial = asyncio.Lock() if in_memory else None
        #: whether the pool has made its first connection (see ``_checkout``)
        self._pool_started = False
        #: sqlite-vec's loadable extension, loaded into each connection (engines
        #: ctxengine creates); None: not installed, or this Python cannot load any
        vectors = self._vector_functions = _vector_extension() if inline else None

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # We issue BEGIN ourselves (BEGIN IMMEDIATE for writes).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            dbapi_connection.create_function("ctx_json_merge", 2, _json_merge, deterministic=True)
            dbapi_connection.create_function("ctx_json_remove", 2, _json_remove, deterministic=True)
            dbapi_connection.create_function(
                "ctx_json_contains_all", 2, _json_contains_all, deterministic=True
            )
            if inline:  # nothing may wait for a lock on the event loop thread
                dbapi_connection.execute("PRAGMA busy_timeout=0")
            if vectors is not None:
                if self._load(dbapi_connection, vectors):
                    # a search reads every vector of its scope: mapped, not copied into
                    # the page cache (100,000 of 384 dimensions: about 30 % faster)
                    dbapi_connection.execute(f"PRAGMA mmap_size={VECTOR_MMAP_SIZE}")
                else:
                    self._vector_functions = None  # searches compare every vector instead

    def _load(self, connection: sqlite3.Connection, extension: str) -> bool:
        """Load ``extension`` into ``connection``; whether it loaded (a failure is
        logged, once per engine: searches stay exact)."""
        try:
            connection.enable_load_extension(True)
            try:
                connection.load_extension(extension)
            finally:
                connection.enable_load_extension(False)
        except sqlite3.Error:
            if self._vector_functions is not None:
                log.warning("sqlite-vec did not load; semantic search stays exact", exc_info=True)
            return False
        return True

    async def vector_search(self, conn: UnitConnection) -> VectorSearch:
        return VECTOR_FUNCTIONS if self._vector_functions is not None else EXACT_ONLY

    def _check_folder(self) -> None:
        """Refuse, before connecting, a database file whose folder does not exist."""
        if self.in_memory or self.url.query.get("uri"):
            return
        folder = Path(str(self.url.database)).parent
        if not folder.is_dir():
            raise DatabaseUnavailableError(
                f"cannot open the SQLite database {self.url.database}: "
                f"the folder {folder} does not exist",
                operation="connect",
                retryable=False,
            )

    async def unit_of_work(
        self,
        work: Callable[[UnitConnection], Awaitable[T]],
        *,
        write: bool,
        one_statement: bool,
    ) -> T:
        if self._serial is not None:
            async with self._serial:
                return await self._unit_of_work(work, write, one_statement)
        return await self._unit_of_work(work, write, one_statement)

    async def _unit_of_work(
        self, work: Callable[[UnitConnection], Awaitable[T]], write: bool, one_statement: bool
    ) -> T:
        if not self._inline:
            return await super().unit_of_work(work, write=write, one_statement=one_statement)
        # the unit of work itself never suspends (unless it waits for another process's
        # write lock): let other tasks run first
        await asyncio.sleep(0)
        if self.closed:  # the engine closed meanwhile
            raise EngineClosedError("closed")
        conn = await self._checkout()
        try:
            if write:
                await self.begin_inline(conn)
        except asyncio.CancelledError:
            raise  # the connection is a worker thread's now (see begin_inline)
        except BaseException:
            _discard(conn)
            raise
        try:
            result = await work(InlineConnection(conn))
            conn.commit()
        except BaseException:
            _discard(conn)
            raise
        conn.close()
        return result

    async def _checkout(self) -> Connection:
        if self._pool_started:
            return self.engine.sync_engine.connect()  # the pool never makes it wait
        # the pool's first connect takes an asyncio lock, which needs a greenlet
        conn = await greenlet_spawn(self.engine.sync_engine.connect)
        self._pool_started = True
        return conn

    async def begin(self, conn: AsyncConnection, *, write: bool) -> None:
        if write:
            await conn.exec_driver_sql("BEGIN IMMEDIATE")

    async def begin_inline(self, conn: Connection) -> None:
        """Open a write transaction on an inline connection. The write lock is taken on
        the loop thread when it is free, else waited for in a worker thread.

        Cancelled while that thread waits, it raises CancelledError at once: the
        connection then belongs to the thread until its wait ends (touching it from the
        loop would block the loop on the connection's mutex for the rest of the busy
        timeout), after which it is rolled back and returned to the pool."""
        conn.begin()  # SQLAlchemy's side of it: pysqlite issues no statement
        raw = conn.connection.driver_connection
        assert isinstance(raw, sqlite3.Connection)
        try:
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not self.is_transient(exc):
                raise
        else:
            return
        busy_ms = self._busy_ms

        def wait_for_lock() -> None:
            raw.execute(f"PRAGMA busy_timeout={busy_ms}")
            try:
                raw.execute("BEGIN IMMEDIATE")
            finally:
                raw.execute("PRAGMA busy_timeout=0")

        waiting = asyncio.get_running_loop().run_in_executor(None, wait_for_lock)
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            waiting.add_done_callback(lambda _: _discard(conn))
            raise

    def _insert(self, table: Table) -> Any:
        return sqlite_insert(table)

    def json_merge(self, column: ColumnElement[Any], patch: dict[str, Any]) -> ColumnElement[Any]:
        text = json.dumps(patch, separators=(",", ":"), ensure_ascii=False)
        return func.ctx_json_merge(column, literal(text))

    def batch_rows(self, name: str, columns: Mapping[str, TypeEngine[Any]]) -> FromClause:
        # SELECT json_extract(value, '$.column') AS column, ... FROM json_each(:name)
        each = func.json_each(bindparam(name, type_=Text())).table_valued("value")
        return select(
            *(
                type_coerce(func.json_extract(each.c.value, f"$.{key}"), type_).label(key)
                for key, type_ in columns.items()
            )
        ).subquery("batch")

    def json_remove(self, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        return func.ctx_json_remove(column, literal(key))

    def json_contains_all(
        self, column: ColumnElement[Any], items: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        return func.ctx_json_contains_all(column, items) == 1

    def is_transient(self, exc: BaseException) -> bool:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(orig, sqlite3.OperationalError):
            text = str(orig).lower()
            return "locked" in text or "busy" in text
        return False

    @property
    def where(self) -> str:
        return "the in-memory database" if self.in_memory else str(self.url.database)

    def _classify(self, error: BaseException) -> Failure | None:
        code = getattr(error, "sqlite_errorcode", None)
        if not isinstance(error, sqlite3.Error) or code is None:
            return None
        entry = _FAILURES.get(code & 0xFF)  # the primary code of an extended one
        if entry is None:
            return None
        kind, reason, retryable = entry
        text = reason.format(where=self.where, busy=self._busy_ms / 1000)
        return Failure(kind, text, retryable, cause=error)
