"""Units of work: one short transaction per public call, retried when transient."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)
from tenacity.stop import stop_base

from ..errors import EngineClosedError, StorageError, StorageTimeoutError
from .backend import Backend
from .connection import Connection

T = TypeVar("T")

#: The longest first back-off after a transient conflict, in seconds (later ones grow).
_FIRST_BACKOFF = 0.01


class Store:
    """The database of one engine: the backend bound to its AsyncEngine, which runs
    units of work; here, what every unit shares: the deadline, retries of transient
    conflicts, and the mapping of database errors to :class:`StorageError`."""

    def __init__(self, backend: Backend, *, retries: int) -> None:
        self.backend = backend
        self.engine: AsyncEngine = backend.engine
        self._retries = retries
        self._bound = backend.call_timeout
        #: the backend's errors, and the error class of the engine's DBAPI (the
        #: driver's adapter raises it unwrapped where SQLAlchemy does not run, as in a
        #: checkout)
        dbapi_error = getattr(getattr(self.engine.dialect, "dbapi", None), "Error", None)
        self._errors: tuple[type[BaseException], ...] = backend.errors + (
            (dbapi_error,) if isinstance(dbapi_error, type) else ()
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
            if self.backend.closed:  # the engine closed under this call: that is why it failed
                raise EngineClosedError("closed") from exc
            raise self.failure(exc, operation) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def failure(self, exc: BaseException, operation: str, doing: str = "") -> StorageError:
        """The :class:`StorageError` subclass a database error ``exc`` of ``operation``
        is (see :meth:`Backend.classify`), its message saying what failed (``doing``,
        when the operation's name does not) and what to do."""
        failure = self.backend.classify(exc)
        cause = failure.cause if failure.cause is not None else exc
        return failure.kind(
            f"{operation or 'a ctxengine call'} failed: {doing}{failure.reason} "
            f"[{type(cause).__name__}: {cause}]",
            operation=operation or None,
            retryable=failure.retryable,
            cause=cause,
        )

    async def _once(
        self, work: Callable[[Connection], Awaitable[T]], write: bool, one_statement: bool
    ) -> T:
        if self.backend.closed:
            raise EngineClosedError("closed")
        return await self.backend.unit_of_work(work, write=write, one_statement=one_statement)

    def connections_in_use(self) -> int:
        """Connections checked out of the pool by units of work running now."""
        return self.backend.connections_in_use()

    async def dispose(self) -> None:
        """Release the pool, if this store created the engine; units of work that begin
        afterwards raise EngineClosedError."""
        await self.backend.dispose()
