"""In-process event bus: post-commit dispatch to handlers and bounded streams."""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .models import Event

log = logging.getLogger("ctxengine.events")

Handler = Callable[[Event], Any]

#: Every event type ctxengine publishes.
EVENT_TYPES = frozenset(
    {
        "session.created",
        "session.paused",
        "session.resumed",
        "session.ended",
        "session.expired",
        "message.added",
        "history.trimmed",
        "history.compacted",
        "usage.recorded",
        "quota.warning",
        "quota.critical",
        "quota.exceeded",
        "rate_limit.exceeded",
        "cleanup.completed",
        "memory.added",
        "memory.deleted",
    }
)


@dataclass(frozen=True, slots=True)
class _Selector:
    types: frozenset[str]
    tenant_id: str | None
    session_id: str | None = None

    def matches(self, event: Event) -> bool:
        return (
            (not self.types or event.type in self.types)
            and (self.tenant_id is None or event.tenant_id == self.tenant_id)
            and (self.session_id is None or event.session_id == self.session_id)
        )


class EventStream:
    """A bounded stream of published events (the oldest are dropped when full): an async
    iterator, and an async context manager that closes it on exit.

    The bus holds streams weakly: one its consumer drops is unregistered at once, as is
    one closed with :meth:`aclose`; neither queues anything more."""

    def __init__(self, bus: EventBus, selector: _Selector, maxsize: int) -> None:
        self._bus = bus
        self._selector = selector
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self._closed = False
        #: How many events were dropped because the consumer fell behind.
        self.dropped = 0

    def _offer(self, event: Event | None) -> None:
        if self._closed:
            return
        if event is not None and not self._selector.matches(event):
            return
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped += 1

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None or self._closed:
            self._closed = True
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Stop receiving events: unregister, drop what is queued, end the iteration
        (a consumer waiting for the next event gets StopAsyncIteration)."""
        if self._closed:
            return
        self._closed = True
        self._bus._streams.discard(self)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class EventBus:
    """Dispatches committed events to subscribers and streams of one engine."""

    def __init__(self) -> None:
        self._handlers: dict[int, tuple[Handler, _Selector]] = {}
        self._next_id = 0
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def idle(self) -> bool:
        """True when nobody listens (publishers may skip building events)."""
        return not self._handlers and not self._streams

    def subscribe(
        self, handler: Handler, types: Iterable[str], tenant_id: str | None
    ) -> Callable[[], None]:
        key = self._next_id
        self._next_id += 1
        self._handlers[key] = (handler, _Selector(frozenset(types), tenant_id))

        def unsubscribe() -> None:
            self._handlers.pop(key, None)

        return unsubscribe

    def stream(
        self, types: Iterable[str], tenant_id: str | None, session_id: str | None, maxsize: int
    ) -> EventStream:
        stream = EventStream(self, _Selector(frozenset(types), tenant_id, session_id), maxsize)
        self._streams.add(stream)
        return stream

    def publish(self, events: Iterable[Event]) -> None:
        """Deliver events: sync handlers run now, async ones are scheduled."""
        for event in events:
            for handler, selector in list(self._handlers.values()):
                if selector.matches(event):
                    self._call(handler, event)
            for stream in list(self._streams):
                stream._offer(event)

    def _call(self, handler: Handler, event: Event) -> None:
        try:
            result = handler(event)
        except Exception:
            log.exception("event handler failed", extra={"event_type": event.type})
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(self._guard(result, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _guard(result: Awaitable[Any], event: Event) -> None:
        try:
            await result
        except Exception:
            log.exception("event handler failed", extra={"event_type": event.type})

    async def aclose(self, grace: float = 1.0) -> None:
        """End every stream; give pending async handlers ``grace`` seconds, then cancel."""
        for stream in list(self._streams):
            stream._offer(None)
        self._streams.clear()
        self._handlers.clear()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=grace)
