"""Units of work: one short transaction per public call, retried when transient."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util.concurrency import greenlet_spawn
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from ..errors import EngineClosedError, StorageTimeoutError
from .backend import Backend
from .connection import Connection
from .prebuilt import AutocommitConnection, HeldConnections
from .sqlite import InlineConnection, InlineSQLiteDialect, LeftToWorker, SQLiteBackend

log = logging.getLogger("ctxengine.storage")

T = TypeVar("T")

#: The longest first back-off after a transient conflict, in seconds (later ones grow).
_FIRST_BACKOFF = 0.01

#: What "the database failed" looks like: SQLAlchemy's wrappers of driver errors, and
#: errors from below SQLAlchemy that can escape it (connect failures, driver internals).
#: Any other SQLAlchemy error is a bug of ours and is not disguised as a storage failure.
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    DBAPIError,
    DisconnectionError,
    PoolTimeoutError,
    OSError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class Store:
    """The database of one engine: an AsyncEngine plus the backend that knows its dialect."""

    def __init__(self, engine: AsyncEngine, backend: Backend, *, owned: bool, retries: int) -> None:
        self.engine = engine
        self.backend = backend
        self.owned = owned
        self._retries = retries
        self._bound = backend.call_timeout
        #: Set by dispose(): units of work that have not begun raise EngineClosedError.
        self._disposed = False
        #: ``_STORAGE_ERRORS`` and the error class of the engine's DBAPI (the driver's
        #: adapter raises it unwrapped where SQLAlchemy does not run, as in a checkout).
        dbapi_error = getattr(getattr(engine.dialect, "dbapi", None), "Error", None)
        self._errors: tuple[type[BaseException], ...] = _STORAGE_ERRORS + (
            (dbapi_error,) if isinstance(dbapi_error, type) else ()
        )
        self._serial = asyncio.Lock() if backend.serialize else None
        #: Set when the driver runs on the calling thread (its calls never suspend).
        self._inline = (
            backend
            if isinstance(backend, SQLiteBackend)
            and isinstance(engine.dialect, InlineSQLiteDialect)
            else None
        )
        #: Whether the inline pool has made its first connection (see _checkout_inline).
        self._pool_started = False
        #: The same pool, with connections in autocommit: units of work that need no
        #: BEGIN/COMMIT (see :attr:`Backend.autocommit_level`) run on it.
        self._autocommit = (
            engine.execution_options(isolation_level=backend.autocommit_level)
            if backend.autocommit_level is not None
            else None
        )
        #: On asyncpg, every unit runs on an entry of the autocommit pool (prebuilt
        #: statements on the driver directly).
        self._held = (
            HeldConnections(self._autocommit, hold=owned)
            if self._autocommit is not None and engine.dialect.driver == "asyncpg"
            else None
        )

    async def run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        *,
        write: bool = True,
        one_statement: bool = False,
        operation: str = "",
    ) -> T:
        """Run ``work`` in one transaction and commit it.

        ``one_statement`` declares that ``work`` writes with a single statement (atomic
        by itself) whenever it succeeds, so a backend may run it without BEGIN/COMMIT.
        Transient conflicts retry the whole transaction a bounded number of times;
        every database error then leaves as the :class:`~ctxengine.errors.StorageError`
        subclass the backend classifies it as (:meth:`Backend.classify`). Errors raised
        by ``work`` itself roll the transaction back and propagate unchanged. Past the
        backend's :attr:`~Backend.call_timeout`, retries included, the call is
        cancelled and raises :class:`~ctxengine.errors.StorageTimeoutError`.
        """
        bound = self._bound
        if bound is None:
            return await self._run(work, write, one_statement, operation, None)
        deadline = asyncio.timeout(bound)
        try:
            async with deadline:
                return await self._run(work, write, one_statement, operation, deadline)
        except TimeoutError as exc:  # only the deadline's: _run raises ours for the driver's
            raise StorageTimeoutError(
                f"{operation or 'a ctxengine call'} failed: {self.backend.where} did not "
                f"answer within {bound:g} s (connect_timeout + statement_timeout): retry",
                operation=operation or None,
                cause=exc,
            ) from exc

    async def _run(
        self,
        work: Callable[[Connection], Awaitable[T]],
        write: bool,
        one_statement: bool,
        operation: str,
        deadline: asyncio.Timeout | None,
    ) -> T:
        try:
            try:
                return await self._once(work, write, one_statement)
            except self._errors as exc:
                if not self._retries or not self.backend.is_transient(exc):
                    raise
            # a conflict: back off, then retry (the first attempt skips this machinery)
            await asyncio.sleep(random.uniform(0, _FIRST_BACKOFF))
            stop: stop_base = stop_after_attempt(self._retries)
            when = None if deadline is None else deadline.when()
            if when is not None:  # no retry begins after its back-off would pass the deadline
                stop |= stop_before_delay(when - asyncio.get_running_loop().time())
            retrying = AsyncRetrying(
                retry=retry_if_exception(self.backend.is_transient),
                stop=stop,
                wait=wait_random_exponential(multiplier=2 * _FIRST_BACKOFF, max=0.5),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    return await self._once(work, write, one_statement)
        except self._errors as exc:
            if self._disposed:  # the engine closed under this call: that is why it failed
                raise EngineClosedError("closed") from exc
            failure = self.backend.classify(exc)
            cause = failure.cause if failure.cause is not None else exc
            raise failure.kind(
                f"{operation or 'a ctxengine call'} failed: {failure.reason} "
                f"[{type(cause).__name__}: {cause}]",
                operation=operation or None,
                retryable=failure.retryable,
                cause=cause,
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self, work: Callable[[Connection], Awaitable[T]], write: bool, one_statement: bool
    ) -> T:
        self._check_open()
        if self._serial is not None:
            async with self._serial:
                return await self._transaction(work, write, one_statement)
        return await self._transaction(work, write, one_statement)

    async def _transaction(
        self, work: Callable[[Connection], Awaitable[T]], write: bool, one_statement: bool
    ) -> T:
        if self._inline is not None:
            return await self._inline_transaction(self._inline, work, write)
        if self._held is not None:
            direct = await self._held.checkout()
            try:
                if one_statement or not write:
                    # each statement commits by itself; nothing to begin or commit
                    return await work(direct)
                return await self._driver_transaction(direct, work)
            except TimeoutError:
                # no answer in time: the server may still run the statement, or be gone
                await direct.invalidate()
                raise
            finally:
                # Not shielded (a task per call): closing suspends only to return the
                # entry to the pool, which returns its slot even if that is
                # interrupted. The cancellation test checks nothing stays checked out.
                await direct.close()
        if self._autocommit is not None and (one_statement or not write):
            async with self._autocommit.connect() as conn:
                return await work(conn)
        async with self.engine.connect() as conn:  # closes even if the caller is cancelled
            return await self._commit(conn, work, write)

    async def _driver_transaction(
        self,
        direct: AutocommitConnection,
        work: Callable[[Connection], Awaitable[T]],
    ) -> T:
        """A transaction of asyncpg's own on a connection SQLAlchemy sees in autocommit:
        statements through SQLAlchemy and prebuilt ones run on the driver directly are
        both inside it. It must end here, since the pool resets autocommit connections
        without a ROLLBACK: one that cannot be rolled back is discarded."""
        transaction = direct.driver.transaction()
        try:
            await transaction.start()
        except BaseException:  # interrupted, the BEGIN may have taken effect or not
            await direct.invalidate()
            raise
        try:
            result = await work(direct)
        except TimeoutError:
            raise  # a ROLLBACK would wait on the same silent server: the caller discards it
        except BaseException:
            try:
                await transaction.rollback()
            except BaseException:
                await direct.invalidate()
                raise
            raise
        try:
            await transaction.commit()
        except BaseException:
            await direct.invalidate()
            raise
        return result

    async def _inline_transaction(
        self, backend: SQLiteBackend, work: Callable[[Connection], Awaitable[T]], write: bool
    ) -> T:
        # the unit of work itself never suspends (unless it waits for another process's
        # write lock): let other tasks run first
        await asyncio.sleep(0)
        self._check_open()  # the engine may have closed meanwhile
        conn = await self._checkout_inline()
        try:
            if write:
                await backend.begin_inline(conn)
            result = await work(InlineConnection(conn))
            conn.commit()
        except LeftToWorker:  # cancelled while a worker thread waits on the connection
            raise
        except BaseException:
            _quiet(conn.rollback)
            conn.close()  # closing it never suspends
            raise
        conn.close()
        return result

    async def _checkout_inline(self) -> SyncConnection:
        if self._pool_started:
            return self.engine.sync_engine.connect()  # the pool never makes it wait
        # the pool's first connect takes an asyncio lock, which needs a greenlet
        conn = await greenlet_spawn(self.engine.sync_engine.connect)
        self._pool_started = True
        return conn

    async def _commit(
        self, conn: AsyncConnection, work: Callable[[Connection], Awaitable[T]], write: bool
    ) -> T:
        await self.backend.begin(conn, write=write)
        try:
            result = await work(conn)
        except BaseException:
            await _quiet_rollback(conn)
            raise
        await conn.commit()
        return result

    def connections_in_use(self) -> int:
        """Connections checked out of the pool by units of work running now."""
        held = self._held.held if self._held is not None else 0
        return int(self.engine.sync_engine.pool.checkedout()) - held  # type: ignore[attr-defined]

    def _check_open(self) -> None:
        if self._disposed:
            raise EngineClosedError("closed")

    async def dispose(self) -> None:
        """Release the pool, if this store created the engine; units of work that begin
        afterwards raise EngineClosedError."""
        self._disposed = True
        if self._held is not None:
            await self._held.close()
        if self.owned:
            await self.backend.dispose(self.engine)


async def _quiet_rollback(conn: AsyncConnection) -> None:
    try:
        await conn.rollback()
    except _STORAGE_ERRORS:  # the connection is gone; the pool will discard it
        log.debug("rollback failed", exc_info=True)


def _quiet(rollback: Callable[[], None]) -> None:
    try:
        rollback()
    except _STORAGE_ERRORS:
        log.debug("rollback failed", exc_info=True)
