"""A blocking facade for synchronous code (SPEC §15): ctxengine's whole API, blocking.

    from ctxengine.sync import ContextEngine

    with ContextEngine("sqlite:///ctx.db") as engine:
        engine.create_session("s-1", "ada")
        with engine.track_request("s-1"):
            ...

Each engine runs its async engine on an event loop of its own, in a thread of anyio's
blocking portal; any number of threads may call it at once. Every coroutine method of
``ctxengine.ContextEngine`` is a plain method here, with the same parameters, defaults
and return type; ``track_request()`` and ``concurrency_slot()`` are ``with`` blocks,
``iter_sessions()`` and ``events()`` plain iterators. Event handlers run on the
engine's loop thread: keep them short, and do not call the engine from them (hand the
work to another thread). ``close()`` (or leaving ``with``) stops the loop thread; an
engine left open is closed when it is collected or the interpreter exits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from anyio.from_thread import start_blocking_portal
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from . import engine as _aio_engine
from . import tenant as _aio_tenant
from ._portal import Portal
from ._sync_api import EngineMethods, TenantViewMethods
from .clock import Clock
from .errors import EngineClosedError
from .events import EventStream as AsyncEventStream
from .events import Handler
from .models import Event, UsageRecord
from .settings import EngineSettings
from .tracking import RequestTracker

__all__ = ["ContextEngine", "EventStream", "TenantView"]


class TenantView(TenantViewMethods):
    """Every call of one tenant, blocking (``engine.tenant("acme")``); see
    ``ctxengine.tenant.TenantView`` for what each call does."""

    def __init__(self, portal: Portal, view: _aio_tenant.TenantView) -> None:
        self._portal = portal
        self._view = view

    @property
    def tenant_id(self) -> str:
        """The tenant this view reads and writes."""
        return self._view.tenant_id

    def tenant(self, tenant_id: str) -> TenantView:
        """A view of the same engine confined to ``tenant_id``."""
        return TenantView(self._portal, self._view.tenant(tenant_id))

    def track_request(
        self, session_id: str, operation: str = "request"
    ) -> AbstractContextManager[RequestTracker]:
        """``with``: check the session can work, then count one request, its time, and an
        error if the block raised (the exception propagates)."""
        view = self._view
        return self._portal.context(lambda: view.track_request(session_id, operation))

    def concurrency_slot(
        self, session_id: str, operation: str = "default"
    ) -> AbstractContextManager[str]:
        """``with``: hold one of the session's concurrency slots while the block runs
        (ConcurrencyLimitError at the cap); the lease is renewed while held."""
        view = self._view
        return self._portal.context(lambda: view.concurrency_slot(session_id, operation))

    def subscribe(self, handler: Handler, *event_types: str) -> Callable[[], None]:
        """Call ``handler(event)`` after each committed change of this tenant (all types
        when none are named), on the engine's loop thread; returns the function that
        unsubscribes (callable from any thread)."""
        return self._on_loop(self._portal.run(self._view.subscribe, handler, *event_types))

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> Callable[[], None]:
        """Call ``callback(record)`` after each recorded usage (on the engine's loop
        thread); returns the unsubscriber."""
        return self._on_loop(self._portal.run(self._view.add_usage_callback, callback))

    def events(self, *event_types: str, session_id: str | None = None) -> EventStream:
        """An iterator of events (bounded: the oldest are dropped when the reader falls
        behind), subscribed now; it ends when the engine closes. Also a context manager:
        left, or closed with ``close()`` (from any thread), it is unsubscribed at once."""
        stream = self._portal.run(self._view.events, *event_types, session_id=session_id)
        return EventStream(self._portal, stream)

    def _on_loop(self, unsubscribe: Callable[[], None]) -> Callable[[], None]:
        portal = self._portal

        def stop() -> None:
            if portal.running and not portal.on_loop_thread():
                try:
                    portal.run(unsubscribe)
                    return
                except EngineClosedError:
                    pass
            unsubscribe()

        return stop


class ContextEngine(TenantView, EngineMethods):
    """``ctxengine.ContextEngine``, blocking: same constructor, same calls, plain
    methods. ``with ContextEngine(url) as engine:`` or ``initialize()`` / ``close()``
    open and close it; the engine is the API of tenant "default"."""

    def __init__(
        self,
        url: str | URL | AsyncEngine | None = None,
        *,
        settings: EngineSettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._engine = _aio_engine.ContextEngine(url, settings=settings, clock=clock)
        super().__init__(Portal(self._engine), self._engine)

    @property
    def settings(self) -> EngineSettings:
        """The engine's settings."""
        return self._engine.settings

    @property
    def is_open(self) -> bool:
        """True between ``initialize()`` and ``close()``."""
        return self._portal.running and self._engine.is_open

    def initialize(self) -> None:
        """Start the engine's loop thread, then connect, migrate when ``auto_migrate``,
        start the cleanup task when ``auto_cleanup``. Again while open: nothing."""
        self._portal.open()

    def close(self) -> None:
        """Close the engine (stop background work, end event streams, release the pool it
        created), then stop its loop thread. Closing twice is fine."""
        self._portal.close()

    def migrate(self, revision: str = "head") -> None:
        """Bring the database to ``revision`` (default: the newest). Works before
        ``initialize()`` too."""
        if self._portal.running:
            self._portal.call(self._engine.migrate, revision)
            return
        if self._engine._state == "closed":
            raise EngineClosedError("closed")
        with start_blocking_portal(name="ctxengine-migrate") as portal:
            portal.call(self._engine.migrate, revision)

    def __enter__(self) -> ContextEngine:
        self.initialize()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventStream:
    """The events of ``engine.events()``, blocking: an iterator, and a context manager
    that closes it on exit. ``close()`` from another thread ends a waiting iteration."""

    def __init__(self, portal: Portal, stream: AsyncEventStream) -> None:
        self._portal = portal
        self._stream = stream
        self._closed = False

    @property
    def dropped(self) -> int:
        """How many events were dropped because the consumer fell behind."""
        return self._stream.dropped

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        if self._closed:
            raise StopIteration
        try:
            finished, event = self._portal.call(_next_event, self._stream)
        except EngineClosedError:
            finished, event = True, None
        if finished or event is None:
            self._closed = True
            raise StopIteration
        return event

    def close(self) -> None:
        """Stop receiving events: unregister, drop what is queued, end the iteration."""
        self._closed = True
        self._portal.release(self._stream.aclose)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed:
            self._portal.soon(self._stream.aclose)


async def _next_event(stream: AsyncEventStream) -> tuple[bool, Event | None]:
    try:
        return False, await stream.__anext__()
    except StopAsyncIteration:
        return True, None
