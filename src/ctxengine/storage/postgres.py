"""PostgreSQL (asyncpg): units of work on held connections, jsonb operators, advisory
transaction locks, what its SQLSTATEs mean."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import (
    ARRAY,
    Boolean,
    ColumnElement,
    String,
    Table,
    Text,
    bindparam,
    cast,
    column,
    event,
    func,
    literal,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import URL, CursorResult, ExceptionContext, make_url
from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool
from sqlalchemy.sql import Executable
from sqlalchemy.sql.selectable import FromClause
from sqlalchemy.types import TypeEngine
from sqlalchemy.util.concurrency import greenlet_spawn, in_greenlet

from ..errors import (
    ConnectionLostError,
    DatabaseFullError,
    DatabaseUnavailableError,
    ReadOnlyDatabaseError,
    StorageError,
    StorageTimeoutError,
    ValidationError,
)
from ..models import Event
from ..settings import EngineSettings
from .backend import (
    EXACT_ONLY,
    GENERIC_ERRORS,
    Backend,
    Failure,
    VectorSearch,
    first_locked,
    lock_key,
)
from .connection import Connection, Params, Rows
from .prebuilt import Result, compiled, run_portable, shape
from .relay import EventRelay

try:
    from sqlalchemy.util import await_
except ImportError:  # SQLAlchemy 2.0
    from sqlalchemy.util import await_only as await_

T = TypeVar("T")

#: serialization_failure, deadlock_detected, lock_not_available, and division_by_zero:
#: ctxengine divides by zero only to abort a one-statement write whose rows changed
#: between its check and its write (see repositories.written_or_abort); a retry
#: sees the change.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "22012"})
#: What an SQLSTATE (or its two-character class) means: the error to raise, the reason
#: (formatted with ``where``, ``database`` and ``user``), whether retrying may help.
_FAILURES: dict[str, tuple[type[StorageError], str, bool]] = {
    "3D000": (
        DatabaseUnavailableError,
        "database {database!r} does not exist at {where}: create it (then run "
        "`ctxengine migrate`) or fix the URL",
        False,
    ),
    "28000": (
        DatabaseUnavailableError,
        "{where} refuses role {user!r}: create the role, or fix the user in the URL "
        "or the server's pg_hba.conf",
        False,
    ),
    "28P01": (
        DatabaseUnavailableError,
        "{where} refuses the password of role {user!r}: fix the password in the URL",
        False,
    ),
    "42501": (
        StorageError,
        "role {user!r} lacks a privilege it needs on database {database!r} at {where}: grant it",
        False,
    ),
    "53300": (
        DatabaseUnavailableError,
        "{where} accepts no more connections (max_connections, or the CONNECTION LIMIT "
        "of role {user!r} or database {database!r}): retry later, lower pool_size, or "
        "raise the limit",
        True,
    ),
    "57P03": (
        DatabaseUnavailableError,
        "{where} is starting up, in recovery or shutting down: retry once it accepts connections",
        True,
    ),
    "57P04": (
        DatabaseUnavailableError,
        "database {database!r} at {where} was dropped: create it again (then run "
        "`ctxengine migrate`) or fix the URL",
        False,
    ),
    "55000": (
        DatabaseUnavailableError,
        "database {database!r} at {where} does not accept connections now (ALLOW_CONNECTIONS "
        "false): retry once it does",
        True,
    ),
    "57P01": (
        ConnectionLostError,
        "{where} terminated the connection (an administrator, or a shutdown): retry",
        True,
    ),
    "57P02": (ConnectionLostError, "{where} crashed and dropped the connection: retry", True),
    "57014": (
        StorageTimeoutError,
        "{where} cancelled the statement (statement_timeout, or a cancel request): retry",
        True,
    ),
    "55P03": (
        StorageTimeoutError,
        "a lock on {where} stayed taken past lock_timeout: retry",
        True,
    ),
    "53100": (
        DatabaseFullError,
        "the disk of the server at {where} is full: free space, then retry",
        False,
    ),
    "25006": (
        ReadOnlyDatabaseError,
        "{where} accepts no writes (a standby, or default_transaction_read_only): point "
        "the URL at the primary",
        False,
    ),
    "08001": (
        DatabaseUnavailableError,
        "cannot connect to {where}: check that it runs and is reachable from here",
        True,
    ),
    "08004": (DatabaseUnavailableError, "{where} rejected the connection: retry", True),
    "08": (ConnectionLostError, "the connection to {where} broke: retry", True),
    "53": (StorageError, "{where} ran out of resources (memory, locks): retry later", True),
}
#: Seconds between two reads of pgvector's state (see PostgresBackend.vector_search).
VECTOR_RECHECK = 30.0
#: pgvector's version, whether ctx_memories has its vector column (migration 0011),
#: and the valid HNSW indexes named for a dimension (ix_ctx_memories_hnsw_<dims>).
_VECTOR_CATALOG = text(
    """SELECT (SELECT extversion FROM pg_extension WHERE extname = 'vector'),
    EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('ctx_memories')
        AND attname = 'embedding_vector' AND NOT attisdropped),
    ARRAY(SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = to_regclass('ctx_memories') AND i.indisvalid
        AND c.relname LIKE 'ix\\_ctx\\_memories\\_hnsw\\_%')"""
).columns(
    column("version", String()),
    column("vector_column", Boolean()),
    column("indexes", ARRAY(Text())),
)


def _version(text: str) -> tuple[int, ...]:
    """A version like "0.8.1" as (0, 8, 1); unreadable parts count as 0."""
    return tuple(int(part) if part.isdigit() else 0 for part in text.split("."))


#: A pooled connection idle longer than this is pinged before use.
PING_AFTER_IDLE = 10.0
#: Where a pool entry's ``info`` keeps when it was last returned to the pool.
IDLE_SINCE = "ctxengine_checkin"
#: Where a held entry's ``info`` keeps when it was taken from the pool.
_TAKEN = "ctxengine_taken"


def connect_args(settings: EngineSettings) -> dict[str, Any]:
    """asyncpg's ``connect()`` arguments for the engine's timeouts: ``timeout`` bounds
    connecting; the server cancels a statement after ``statement_timeout`` (57014, the
    connection stays usable), and the client stops waiting for an answer shortly
    after (``command_timeout``), when the server does not answer at all.

    Through a pooler in transaction mode (``transaction_pooling``) consecutive
    transactions of a connection may run on different server connections: a statement
    prepared on one is unknown to the next, so asyncpg keeps none (``statement_cache_size
    = 0``: each statement is parsed unnamed, in the round trip that runs it, after one
    that describes it). And PgBouncer refuses a connection that sends a setting it does
    not track (``statement_timeout``): the client's ``command_timeout`` alone bounds a
    statement then, unless the server has a ``statement_timeout`` of its own (for the
    role or database)."""
    args: dict[str, Any] = {"timeout": settings.connect_timeout}
    seconds = settings.statement_timeout
    if seconds is not None:
        if not settings.transaction_pooling:
            args["server_settings"] = {"statement_timeout": str(max(1, round(seconds * 1000)))}
        args["command_timeout"] = seconds + min(1.0, seconds / 10)
    if settings.transaction_pooling:
        args["statement_cache_size"] = 0
    return args


def events_url(settings: EngineSettings, url: URL) -> URL:
    """Where the event relay listens: ``settings.events_url``, else ``url``."""
    if settings.events_url is None:
        return url
    try:
        found = make_url(settings.events_url)
    except ArgumentError:
        found = None
    if found is None or found.get_backend_name() not in ("postgresql", "postgres"):
        raise ValidationError(
            f"events_url {settings.events_url!r} is not a PostgreSQL URL "
            "(postgresql://user@host:port/database)",
            field="events_url",
            value=settings.events_url,
        )
    return found


#: Seconds a closing engine waits for the server to take a connection's goodbye.
GOODBYE = 0.5
#: Seconds a connection whose unit was cancelled has to settle (the statement in flight
#: cancelled, the transaction rolled back) before it is discarded instead.
SETTLE = 2.0


class HeldConnections:
    """The pool entries units of work on asyncpg take and return.

    A checkout from SQLAlchemy's async pool and its return cost about 90 µs of CPU
    (two greenlet spawns, the pool's events and queue): 40 % of update_session's
    client CPU from 16 tasks. So a unit returns its entry here, still checked out,
    and the next unit takes the one returned last (the pool's own LIFO order) for
    the cost of a list pop. The pool stays in charge of its connections: an entry
    goes back to it when it has been out for :data:`PING_AFTER_IDLE`
    seconds (the pool then pings it if it was idle that long, and recycles it when
    old), when its connection is closed, when a unit waits for the pool, when the
    pool has opened connections above ``pool_size`` (it closes those on return), and
    when every other connection of the pool is held here (one stays in the pool).
    Only an engine the store owns holds entries: another user of a shared pool would
    wait for connections held here.

    When every connection the pool may open is out (``limit``: ``pool_size +
    max_overflow``), a unit waits here, not in the pool, and the next unit to finish
    hands it its entry directly (FIFO among waiters, at most ``timeout`` seconds, then
    the pool's own TimeoutError). Waiting in the pool cost each call a return and a
    checkout through it: get_session from 16 tasks on 10 connections ran at 0.41 of
    the raw driver on as many connections that way.
    """

    __slots__ = (
        "_adopting",
        "_idle",
        "_limit",
        "_pool",
        "_timeout",
        "_view",
        "_waiters",
        "_waiting",
    )

    def __init__(
        self, view: AsyncEngine, *, hold: bool, limit: int = 0, timeout: float = 30.0
    ) -> None:
        #: the engine in autocommit the entries are checked out from
        self._view = view
        pool = view.sync_engine.pool
        self._pool = pool if hold and isinstance(pool, QueuePool) else None
        self._idle: list[PoolProxiedConnection] = []
        #: units waiting for the pool: returned entries go to the pool, not here
        self._waiting = 0
        #: connections the pool may have out at once (0: no waiting here)
        self._limit = limit
        #: seconds a unit waits here for an entry
        self._timeout = timeout
        #: units waiting here for an entry (None: look at the pool again)
        self._waiters: collections.deque[asyncio.Future[PoolProxiedConnection | None]] = (
            collections.deque()
        )
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
        while self._full():
            handed = await self._handed()
            if handed is None:
                continue  # a connection went back to the pool, or was closed: look again
            if (
                time.monotonic() - handed.info[_TAKEN] < PING_AFTER_IDLE
                and not handed.driver_connection.is_closed()  # type: ignore[union-attr]
            ):
                return AutocommitConnection(self, handed)
            await self.finish(handed.close)
        self._waiting += 1
        try:
            entry = await self._checkout()
        finally:
            self._waiting -= 1
        entry.info[_TAKEN] = time.monotonic()
        return AutocommitConnection(self, entry)

    def _full(self) -> bool:
        """Whether every connection the pool may open is out, or being checked out."""
        pool = self._pool
        if pool is None or self._limit <= 0:
            return False
        return bool(pool.checkedout() + self._waiting >= self._limit)

    async def _handed(self) -> PoolProxiedConnection | None:
        """The entry a finishing unit hands this one, or None when one went back to the
        pool or was closed (the caller looks at the pool again)."""
        waiter: asyncio.Future[PoolProxiedConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:  # handed over as this unit gave up: pass it on
                    self.adopt(self.checkin(handed))
                else:
                    self._nudge()  # the look again it was told to take, for another
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                limit, seconds = self._limit, self._timeout
                raise PoolTimeoutError(
                    f"no connection of the pool's {limit} came free within {seconds} s"
                ) from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _nudge(self) -> None:
        """Tell the first waiting unit to look at the pool again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

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
        while pool is not None and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(entry)  # still checked out: from this unit to that one
                return
        if (
            pool is not None
            and not self._waiting
            and pool.overflow() <= 0
            # one of the pool's connections stays in it: a checkout from the pool
            # itself would wait for as long as every one is held idle here
            and (self._limit <= 0 or len(self._idle) < self._limit - 1)
        ):
            entry.info[IDLE_SINCE] = time.monotonic()
            self._idle.append(entry)
        else:
            await self.finish(entry.close)

    def later(self, call: Callable[[], object]) -> asyncio.Future[object]:
        """Run the pool's ``call`` (a return, an invalidation: it may suspend) in a task
        of its own, to its end whatever happens to the unit that asked for it."""
        return self.adopt(greenlet_spawn(call))

    def adopt(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """Run ``work`` in a task of its own, kept until it ends."""
        done = asyncio.ensure_future(work)
        self._adopting.add(done)
        done.add_done_callback(self._adopting.discard)
        return done

    def later_nudging(self, call: Callable[[], object]) -> asyncio.Future[object]:
        """:meth:`later`, then a waiting unit looks at the pool again (``call`` gave a
        connection back to it, or closed one)."""
        done = self.later(call)
        done.add_done_callback(lambda _: self._nudge())
        return done

    async def finish(self, call: Callable[[], object]) -> None:
        """Run the pool's ``call`` to its end even if the unit is cancelled meanwhile,
        which gets its CancelledError at once: interrupted, the pool logs an error and
        closes nothing."""
        await asyncio.shield(self.later_nudging(call))

    async def close(self) -> None:
        """Return every entry to the pool and hold none from now on."""
        self._pool = None
        while self._waiters:
            self._nudge()
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

    async def run(
        self, statement: Executable, parameters: Params, as_dicts: bool = False, raw: bool = False
    ) -> Rows:
        form = compiled(statement, self.dialect)
        driver = self.driver
        if not isinstance(parameters, Mapping):
            if form.types:  # rows of parameters, rows returned: SQLAlchemy's insertmanyvalues
                connection = await self._connection()
                return await run_portable(connection, statement, parameters, as_dicts, raw)
            await driver.executemany(form.sql, [form.values(p) for p in parameters])
            return Result([], -1)
        values = form.values(parameters)
        if not form.types:
            status = await driver.execute(form.sql, *values)
            count = status.rsplit(" ", 1)[-1]
            return Result([], int(count) if count.isdigit() else -1)
        converters = form.converters
        if converters is None:  # the driver's column types (OIDs), as SQLAlchemy reads them
            prepared = await driver.prepare(form.sql)
            converters = form.converters_for([a.type.oid for a in prepared.get_attributes()])
        return Result.of(await driver.fetch(form.sql, *values), converters[shape(as_dicts, raw)])

    async def execute(
        self, statement: Executable, parameters: Params | None = None
    ) -> CursorResult[*tuple[Any, ...]]:
        return await (await self._connection()).execute(statement, parameters)

    async def run_sync(self, fn: Callable[[SyncConnection], T]) -> T:
        return await (await self._connection()).run_sync(fn)

    def discard(self) -> None:
        """Discard the connection without waiting for anything (no goodbye to a server
        that may not answer): the server rolls back what was not committed, the pool
        replaces the connection."""
        if self._returned:
            return
        self._returned = True
        self._discard()

    def _discard(self) -> None:
        self.driver.terminate()
        if self._conn is None:
            self._held.later_nudging(self.entry.invalidate)  # it returns the entry too
        else:
            sync = self._conn.sync_connection
            if sync is not None:
                self._held.later_nudging(partial(_invalidate, sync))

    def release_later(self, transaction: Any = None) -> None:
        """Give the connection back without making a cancelled unit wait: in a task of
        its own, asyncpg finishes cancelling the statement in flight (it asks the
        server to), ``transaction`` is rolled back, then the connection is returned;
        one that does not settle within :data:`SETTLE` seconds is discarded."""
        if self._returned:
            return
        self._returned = True
        self._held.adopt(self._settle(transaction))

    async def _settle(self, transaction: Any) -> None:
        try:
            async with asyncio.timeout(SETTLE):
                if transaction is not None:
                    await transaction.rollback()
                else:
                    await self.driver.execute("SELECT 1")  # after the cancellation ends
        except BaseException:
            self._discard()
            return
        await self._give_back()

    async def close(self) -> None:
        """Return the connection, unless it was discarded or is being released."""
        if self._returned:
            return
        self._returned = True
        await self._give_back()

    async def _give_back(self) -> None:
        """To the pool when an AsyncConnection was made on it, else to the held entries;
        never inside a transaction (discarded then)."""
        if self.driver.is_in_transaction():
            self._discard()
        elif self._conn is not None:
            await self._conn.close()
            self._held._nudge()  # back in the pool: a waiting unit takes it there
        else:
            await self._held.checkin(self.entry)


def _invalidate(conn: SyncConnection) -> None:
    conn.invalidate()
    conn.close()


async def _driver_transaction(
    direct: AutocommitConnection, work: Callable[[Connection], Awaitable[T]]
) -> T:
    """A transaction of asyncpg's own on a connection SQLAlchemy sees in autocommit:
    statements through SQLAlchemy and prebuilt ones run on the driver directly are
    both inside it. It must end here, since the pool resets autocommit connections
    without a ROLLBACK: one that cannot be rolled back is discarded; a cancelled unit
    leaves the ROLLBACK to a task of its own."""
    transaction = direct.driver.transaction()
    try:
        await transaction.start()
    except BaseException:
        # the BEGIN may have taken effect or not, and asyncpg keeps a transaction whose
        # start failed as the connection's own (it would make every later one a
        # savepoint of it): the connection is of no further use
        direct.discard()
        raise
    try:
        result = await work(direct)
    except asyncio.CancelledError:
        direct.release_later(transaction)
        raise
    except TimeoutError:
        raise  # a ROLLBACK would wait on the same silent server: the unit discards it
    except BaseException:
        try:
            await transaction.rollback()
        except BaseException:
            direct.discard()
            raise
        raise
    try:
        await transaction.commit()
    except BaseException:
        direct.discard()
        raise
    return result


class PostgresBackend(Backend):
    """Units of work run on pool entries held between units (:class:`HeldConnections`)
    that SQLAlchemy sees in autocommit: reads and single-statement writes skip the
    BEGIN and COMMIT round trips (every statement sees a consistent snapshot of its
    own, as on SQLite); other writes run in a transaction of asyncpg's own. Prebuilt
    statements run on asyncpg directly."""

    name = "postgresql"
    errors = (
        *GENERIC_ERRORS,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    )
    data_modifying_ctes = True
    # Each batch is one UPDATE in one server process, bound by its CPU: two at once
    # expired 100,000 of 1,000,000 sessions in 2.0-2.1 s instead of 3.0 s here.
    sweep_workers = 2
    #: EngineSettings.connect_timeout (set by bind), for the event relay's connection.
    connect_timeout: float
    #: where the event relay listens (set by bind): EngineSettings.events_url, else the URL
    events_url: URL

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        #: the driver connections checked in to the pool (see ``dispose``)
        self._idle: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()
        #: (when read, what was read) of :meth:`vector_search`
        self._vector_search: tuple[float, VectorSearch] = (-VECTOR_RECHECK, EXACT_ONLY)

    def engine_options(self, settings: EngineSettings) -> dict[str, Any]:
        return {
            "connect_args": connect_args(settings),
            "pool_size": settings.pool_size,
            "max_overflow": settings.max_overflow,
            # a call waits for a pooled connection no longer than it would for a new one
            "pool_timeout": min(settings.pool_timeout, settings.connect_timeout),
            "pool_recycle": settings.pool_recycle,
            "pool_pre_ping": settings.pool_pre_ping,
            # The connection used last is taken first: each server process stays warm
            # (CPU caches, plans), where a FIFO pool rotates every call over all of
            # them. Measured: update_session 1.5k/s FIFO, 2.5k/s LIFO, pool of 16.
            "pool_use_lifo": True,
        }

    def bind(self, engine: AsyncEngine, settings: EngineSettings, *, owned: bool) -> None:
        super().bind(engine, settings, owned=owned)
        self._held = HeldConnections(
            engine.execution_options(isolation_level="AUTOCOMMIT"),
            hold=owned,
            limit=settings.pool_size + settings.max_overflow,
            timeout=min(settings.pool_timeout, settings.connect_timeout),
        )
        # Without pool_pre_ping's round trip on every checkout: a connection the server
        # closed (restart, pg_terminate_backend) is known to asyncpg already, and only
        # one idle for a while, which a network could have dropped silently, is pinged.
        dialect = engine.dialect
        self.connect_timeout = settings.connect_timeout
        self.events_url = events_url(settings, self.url)
        if settings.statement_timeout is not None:
            self.call_timeout = settings.connect_timeout + settings.statement_timeout

        checked_in = self._idle

        @event.listens_for(engine.sync_engine, "checkout")
        def _on_checkout(dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
            driver: asyncpg.Connection = record.driver_connection
            checked_in.discard(driver)
            if driver.is_closed():
                raise DisconnectionError("the server closed the connection")
            idle = time.monotonic() - record.info.get(IDLE_SINCE, time.monotonic())
            if idle > PING_AFTER_IDLE:
                try:
                    answered = dialect.do_ping(dbapi_connection)
                except Exception:  # broken, or no answer within command_timeout
                    answered = False
                if not answered:  # the pool replaces it; no goodbye the server may not read
                    driver.terminate()
                    raise DisconnectionError("the connection does not answer")

        @event.listens_for(engine.sync_engine, "handle_error")
        def _on_error(context: ExceptionContext) -> None:
            # SQLAlchemy discards a connection whose statement timed out or was
            # cancelled, saying goodbye first: up to 2 s more when the server does not
            # answer. Closed here, it is discarded at once.
            error, conn = context.original_exception, context.connection
            if (
                isinstance(error, TimeoutError | asyncio.CancelledError)
                and conn is not None
                and not (conn.invalidated or conn.closed)
            ):
                driver = conn.connection.driver_connection
                if driver is not None:
                    driver.terminate()

        @event.listens_for(engine.sync_engine, "close")
        def _on_close(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            # The pool closes a connection (above pool_size on return, recycled, at
            # dispose) with asyncpg's goodbye, which waits out command_timeout on a
            # server that does not answer, then logs an error. Said here, the goodbye
            # waits at most GOODBYE seconds; the pool's close then finds it closed.
            driver: asyncpg.Connection | None = record.driver_connection
            if driver is None or driver.is_closed():
                return
            if not in_greenlet():
                driver.terminate()
                return
            try:
                await_(driver.close(timeout=GOODBYE))
            except Exception:  # no answer in time, or already broken
                driver.terminate()

        @event.listens_for(engine.sync_engine, "checkin")
        def _on_checkin(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
            record.info[IDLE_SINCE] = time.monotonic()
            if record.driver_connection is not None:
                checked_in.add(record.driver_connection)

    async def unit_of_work(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        write: bool,
        one_statement: bool,
    ) -> T:
        direct = await self._held.checkout()
        try:
            if one_statement or not write:
                # each statement commits by itself; nothing to begin or commit
                result = await work(direct)
            else:
                result = await _driver_transaction(direct, work)
        except asyncio.CancelledError:
            direct.release_later()  # the caller goes at once
            raise
        except TimeoutError:
            # no answer in time: the server may still run the statement, or be gone
            direct.discard()
            raise
        except BaseException:
            await direct.close()
            raise
        # a return suspends only to give the entry back to the pool, which it finishes
        # even if this unit is cancelled meanwhile
        await direct.close()
        return result

    def connections_in_use(self) -> int:
        return super().connections_in_use() - self._held.held

    async def dispose(self) -> None:
        """Return the held entries; then, for an engine the store created, say goodbye
        on every idle connection at once, each waiting at most :data:`GOODBYE` seconds
        for the server (then closed all the same), and let the pool go: bounded, and
        quiet, when the server does not answer (SQLAlchemy's dispose closes them one
        after another, each waiting out ``command_timeout``)."""
        self.closed = True
        await self._held.close()
        if self.owned:
            goodbyes = [c.close(timeout=GOODBYE) for c in self._idle if not c.is_closed()]
            await asyncio.gather(*goodbyes, return_exceptions=True)
            await self.engine.dispose()

    async def vector_search(self, conn: Connection) -> VectorSearch:
        """pgvector's column and HNSW indexes (read from the catalog at most every
        :data:`VECTOR_RECHECK` seconds, so an index created or dropped meanwhile is
        used or left within that time: a search planned for a dropped index is still
        exact, only slower)."""
        checked, found = self._vector_search
        if time.monotonic() - checked < VECTOR_RECHECK:
            return found
        row = (await conn.run(_VECTOR_CATALOG, {})).first()
        assert row is not None
        version, column, indexes = row
        dims = {int(name.rsplit("_", 1)[1]) for name in indexes if name.rsplit("_", 1)[1].isdigit()}
        usable = column and version is not None and _version(version) >= (0, 8)
        found = VectorSearch(vector_column=bool(column), indexed=frozenset(dims if usable else ()))
        self._vector_search = (time.monotonic(), found)
        return found

    async def lock(self, conn: Connection, name: str) -> None:
        await conn.execute(select(func.pg_advisory_xact_lock(lock_key(name))))

    def locked(
        self, table: Table, where: Sequence[ColumnElement[bool]], order_by: Any, limit: int
    ) -> ColumnElement[bool]:
        # The rows by their physical address (ctid), valid while they stay locked: the
        # update reads them directly (a TID scan). Joined on the key, a batch of 5,000
        # was planned as a hash join over the whole table (150,000 rows: 58 ms of the
        # batch's 176).
        ctid: ColumnElement[Any] = literal_column("ctid")
        found = first_locked(select(ctid).select_from(table), where, order_by, limit)
        return ctid == func.any(
            func.array(found.scalar_subquery())
        )  # ctid = ANY(ARRAY((SELECT ctid …)))

    def _insert(self, table: Table) -> Any:
        return pg_insert(table)

    def json_merge(self, column: ColumnElement[Any], patch: dict[str, Any]) -> ColumnElement[Any]:
        return column.op("||")(cast(literal(patch, JSONB), JSONB))

    def batch_rows(self, name: str, columns: Mapping[str, TypeEngine[Any]]) -> FromClause:
        # jsonb_to_recordset(CAST(:name AS jsonb)) AS batch(column type, ...)
        document = cast(bindparam(name, type_=Text()), JSONB)
        rows = func.jsonb_to_recordset(document).table_valued(
            *(column(key, type_) for key, type_ in columns.items()), name="batch"
        )
        return rows.render_derived(with_types=True)

    def json_remove(self, column: ColumnElement[Any], key: str) -> ColumnElement[Any]:
        return column.op("-")(literal(key, String))

    def json_contains_all(
        self, column: ColumnElement[Any], items: ColumnElement[Any]
    ) -> ColumnElement[bool]:
        return column.op("@>", return_type=Boolean)(cast(items, JSONB))

    def event_relay(self, deliver: Callable[[Event], None]) -> EventRelay:
        return EventRelay(self.events_url, deliver, connect_timeout=self.connect_timeout)

    def is_transient(self, exc: BaseException) -> bool:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        return state in _TRANSIENT_SQLSTATES

    @property
    def where(self) -> str:
        return f"{self.url.host or 'localhost'}:{self.url.port or 5432}"

    def _classify(self, error: BaseException) -> Failure | None:
        state = getattr(error, "sqlstate", None)
        if state == "08P01" and "unsupported startup parameter" in str(error):
            return Failure(
                DatabaseUnavailableError,
                f"{self.where} refuses a setting sent when connecting ({error}): a pooler "
                "such as PgBouncer; in transaction mode set transaction_pooling=True, "
                "else add the setting to its ignore_startup_parameters",
                False,
                cause=error,
            )
        if isinstance(state, str):
            entry = _FAILURES.get(state) or _FAILURES.get(state[:2])
            if entry is None:
                return None
            kind, reason, retryable = entry
            text = reason.format(
                where=self.where, database=self.url.database, user=self.url.username
            )
            return Failure(kind, text, retryable, cause=error)
        if isinstance(error, asyncpg.ClientConfigurationError):
            return Failure(
                StorageError, "the connection settings are invalid: fix the URL", cause=error
            )
        if isinstance(error, asyncpg.InterfaceError | asyncpg.InternalClientError):
            # "another operation is in progress", "connection is closed": the driver
            # lost track of a connection (cancelled or broken mid-call)
            return Failure(
                ConnectionLostError,
                f"the connection to {self.where} is no longer usable: retry (the pool replaces it)",
                cause=error,
            )
        return None
