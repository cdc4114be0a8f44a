"""What every service shares: the store, the event bus, the clock and the settings."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from ..clock import Clock
from ..errors import ContextEngineError
from ..events import EventBus
from ..models import Event
from ..redaction import Redactor
from ..settings import EngineSettings
from ..storage import Store
from ..storage.connection import Connection
from ..storage.relay import EventRelay

T = TypeVar("T")


@dataclass(slots=True)
class Effects:
    """What a unit of work leaves for after its commit: events, and an error to raise."""

    now: datetime
    #: Whether anyone may hear events; when not, ``emit`` builds none.
    listened: bool = True
    events: list[Event] = field(default_factory=list)
    error: ContextEngineError | None = None
    rollback: bool = False

    def refuse(self, error: ContextEngineError) -> None:
        """Roll the whole unit of work back, still publish its events, then raise ``error``."""
        self.error = error
        self.rollback = True

    def emit(
        self,
        type_: str,
        tenant_id: str,
        session_id: str | None = None,
        user_id: str | None = None,
        **data: Any,
    ) -> None:
        if not self.listened:
            return
        self.events.append(
            Event.model_construct(
                type=type_,
                session_id=session_id,
                user_id=user_id,
                tenant_id=tenant_id,
                at=self.now,
                data=data,
            )
        )


class _Refused(Exception):
    """Carries the effects of a refused unit of work out through the rollback."""

    def __init__(self, effects: Effects) -> None:
        self.effects = effects


Work = Callable[[Connection, Effects], Awaitable[T]]
#: What a call is wrapped in when no observer is attached.
_UNOBSERVED = nullcontext()

#: Wraps every unit of work, given its operation name (tracing, metrics).
CallObserver = Callable[[str], AbstractContextManager[None]]


@dataclass(slots=True)
class Context:
    """Dependencies of the services of one engine."""

    store: Store
    bus: EventBus
    clock: Clock
    settings: EngineSettings
    #: Forwards events to other engines on the database (``cross_process_events``).
    relay: EventRelay | None = None
    #: Shared with the engine, so instrumentation may be attached at any time.
    observers: list[CallObserver] = field(default_factory=list)
    redactor: Redactor = field(init=False)

    def __post_init__(self) -> None:
        self.redactor = Redactor(self.settings.redact_patterns)

    async def transact(
        self,
        work: Work[T],
        *,
        write: bool = True,
        one_statement: bool = False,
        operation: str = "",
        observed: bool = False,
    ) -> T:
        """Run ``work`` as one unit of work, then publish its events and raise the error
        it left: after the commit (a change it committed, such as a lazy expiry, stays),
        or after the rollback when it refused (see :meth:`Effects.refuse`).
        ``one_statement``: see :meth:`Store.run` (not with the relay, whose NOTIFY is a
        statement of the same transaction). ``observed``: the caller already wraps the
        call in :meth:`observing`."""
        one_statement = one_statement and self.relay is None
        if not self.observers or observed:
            return await self._transact(work, write, one_statement, operation)
        with self.observing(operation):
            return await self._transact(work, write, one_statement, operation)

    def observing(self, operation: str) -> AbstractContextManager[None]:
        """Wrap one call of ``operation`` in the observers (see :data:`CallObserver`)."""
        return self._observed(operation) if self.observers else _UNOBSERVED

    @contextmanager
    def _observed(self, operation: str) -> Iterator[None]:
        with ExitStack() as observed:
            for observer in self.observers:
                observed.enter_context(observer(operation))
            yield

    async def _transact(self, work: Work[T], write: bool, one_statement: bool, operation: str) -> T:
        effects: Effects | None = None

        async def attempt(conn: Connection) -> T:
            nonlocal effects
            effects = Effects(self.clock(), listened=self.listened)
            result = await work(conn, effects)
            if effects.rollback:
                raise _Refused(effects)
            if self.relay is not None:
                await self.relay.notify(conn, effects.events)  # sent on commit
            return result

        try:
            result = await self.store.run(
                attempt, write=write, one_statement=one_statement, operation=operation
            )
        except _Refused as refused:
            effects = refused.effects
            await self.announce(effects.events)
        else:
            assert effects is not None
            self.bus.publish(effects.events)
        if effects.error is not None:
            raise effects.error
        return result

    @property
    def listened(self) -> bool:
        """Whether anyone may hear events (publishers skip building them otherwise)."""
        return self.relay is not None or not self.bus.idle

    async def announce(self, events: list[Event]) -> None:
        """Publish events that no committed transaction carried (to other engines too)."""
        self.bus.publish(events)
        relay = self.relay
        if relay is not None and events:

            async def send(conn: Connection) -> None:
                await relay.notify(conn, events)

            await self.store.run(send, operation="announce_events")


def done(result: T | None) -> T:
    """The result of a unit of work that returns None only when it left an error
    (which ``transact`` raised before this is reached)."""
    assert result is not None
    return result
