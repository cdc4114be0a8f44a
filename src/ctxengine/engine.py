"""ContextEngine: the open/closed lifecycle around the services, and the default tenant's API."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import migrate as migrations
from .cleanup import CleanupLoop
from .clock import Clock, checked, system_clock
from .errors import EngineClosedError, StorageError
from .events import EventBus
from .runtime import Runtime
from .services.base import CallObserver, Context
from .settings import EngineSettings
from .storage import Store, normalize_url, open_store, resolve_url
from .storage.connection import Connection
from .storage.relay import DRIVER_ERRORS
from .tenant import TenantView

log = logging.getLogger("ctxengine")

_State = Literal["new", "open", "closed"]


class ContextEngine(TenantView):
    """Durable session state for AI agents, on SQLite or PostgreSQL.

    ``ContextEngine(url)`` chooses the storage from the URL (default:
    ``CTXENGINE_DATABASE_URL``, else ``./ctxengine.db``); ``async with`` or
    ``initialize()`` / ``close()`` open and close it. The engine itself is the API of
    tenant "default"; ``engine.tenant(name)`` gives the same API for another tenant.
    """

    def __init__(
        self,
        url: str | URL | AsyncEngine | None = None,
        *,
        settings: EngineSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(self, "default")
        self.settings = settings if settings is not None else EngineSettings()
        self._target = url
        self._clock: Clock = checked(clock) if clock is not None else system_clock
        self._state: _State = "new"
        self._live: Runtime | None = None
        self._opening = asyncio.Lock()
        self._observers: list[CallObserver] = []
        # Fail fast on an unsupported URL, before anything connects.
        if not isinstance(url, AsyncEngine):
            normalize_url(resolve_url(url, self.settings))

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        """True between ``initialize()`` and ``close()``."""
        return self._state == "open"

    async def initialize(self) -> None:
        """Connect, migrate when ``auto_migrate``, start the cleanup task when
        ``auto_cleanup``. Calling it again while open does nothing."""
        async with self._opening:
            if self._state == "open":
                self._runtime()  # WrongEventLoopError from another loop
                return
            if self._state == "closed":
                raise EngineClosedError("closed")
            store = open_store(self._target, self.settings)
            try:
                if self.settings.auto_migrate:
                    await self._migrate_with(store, "head")
                else:
                    await store.run(_ping, write=False, operation="connect")
            except BaseException:
                await store.dispose()
                raise
            bus = EventBus()
            relay = None
            if self.settings.cross_process_events:
                try:
                    relay = store.backend.event_relay(lambda event: bus.publish([event]))
                    await relay.start()
                except BaseException as exc:
                    await store.dispose()
                    if isinstance(exc, DRIVER_ERRORS):
                        doing = "cannot listen for events of other engines (cross_process_events): "
                        raise store.failure(exc, "initialize", doing) from exc
                    raise
            ctx = Context(store, bus, self._clock, self.settings, relay, self._observers)
            cleanup = None
            if self.settings.auto_cleanup:
                cleanup = CleanupLoop(self._sweep, self.settings.cleanup_interval)
            self._live = Runtime.open(ctx, cleanup)
            self._state = "open"
            if cleanup is not None:
                cleanup.start()
            log.info("engine open", extra={"backend": store.backend.name})

    def _observe(self, observer: CallObserver) -> Callable[[], None]:
        """Wrap every unit of work in ``observer(operation)`` (used by the integrations)."""
        self._observers.append(observer)

        def detach() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return detach

    async def _sweep(self) -> int:
        runtime = self._runtime()
        expired = await runtime.sessions.expire_stale(None, None)
        await runtime.memory.sweep()  # expired memory items (logged by the sweep itself)
        return expired

    async def close(self) -> None:
        """Stop background work (the cleanup task, automatic compactions: at most about
        a second each), end event streams, release the connection pool if the engine
        created it. Closing twice is fine."""
        if self._live is not None:
            self._runtime()  # WrongEventLoopError from another loop
        async with self._opening:
            runtime, self._live = self._live, None
            self._state = "closed"
            if runtime is None:
                return
            if runtime.cleanup is not None:
                await runtime.cleanup.stop()
            await runtime.context.stop()  # automatic compactions: finished or cancelled
            if runtime.ctx.relay is not None:
                await runtime.ctx.relay.stop()
            await runtime.leases.release_all()
            await runtime.ctx.bus.aclose()
            await runtime.ctx.store.dispose()

    async def __aenter__(self) -> ContextEngine:
        await self.initialize()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def _store(self) -> Store:
        """The open engine's storage (for diagnostics and tests)."""
        return self._runtime().ctx.store

    # -- operations ---------------------------------------------------------------------
    async def migrate(self, revision: str = "head") -> None:
        """Bring the database to ``revision`` (default: the newest). Several processes may
        do this at once: they migrate once. Works before ``initialize()`` too."""
        if self._live is not None:
            await self._migrate_with(self._runtime().ctx.store, revision)
            return
        if self._state == "closed":
            raise EngineClosedError("closed")
        store = open_store(self._target, self.settings)
        try:
            await self._migrate_with(store, revision)
        finally:
            await store.dispose()

    async def _migrate_with(self, store: Store, revision: str) -> None:
        async with migrations.maintenance(store, self._target, self.settings) as unbounded:
            await migrations.migrate(unbounded, revision, settings=self.settings)

    async def health_check(self) -> dict[str, Any]:
        """Whether the database answers: status, backend, latency_ms, schema_revision.

        Never raises for a database failure: the status is then "unhealthy", with
        ``error`` (the message), ``error_type`` (the error's class name) and
        ``retryable``."""
        store = self._runtime().ctx.store
        started = time.perf_counter()
        report: dict[str, Any] = {"status": "healthy", "backend": store.backend.name}
        try:
            # one unit of work, so one deadline: reading the revision is the ping
            report["schema_revision"] = await store.run(
                _probe, write=False, operation="health_check"
            )
        except Exception as exc:  # a probe reports; it does not fail
            if not isinstance(exc, StorageError):
                log.error("health_check failed unexpectedly", exc_info=exc)
            report |= {
                "status": "unhealthy",
                "schema_revision": None,
                "error": str(exc),
                "error_type": type(exc).__name__,
                "retryable": getattr(exc, "retryable", False),
            }
        report["latency_ms"] = (time.perf_counter() - started) * 1000
        return report

    def _tenant_filter(self) -> str | None:
        # Subscribers on the engine itself hear every tenant; views hear their own.
        return None


async def _ping(conn: Connection) -> None:
    await conn.execute(text("SELECT 1"))


async def _probe(conn: Connection) -> str | None:
    """The schema revision (None: not migrated); reading it is a round trip."""
    return await conn.run_sync(migrations._read_revision)
