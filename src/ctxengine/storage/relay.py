"""Events across processes on PostgreSQL: NOTIFY in the committing transaction, LISTEN on
a dedicated connection that reconnects after it is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import URL

from ..models import Event
from .connection import Connection

log = logging.getLogger("ctxengine.events")

CHANNEL = "ctxengine_events"
#: PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
MAX_PAYLOAD_BYTES = 7900
_NOTIFY = text(
    "SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload"
)


#: What a failure of the listening connection raises (TimeoutError is an OSError;
#: asyncpg's client-state errors included: they would end the reconnecting task).
DRIVER_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class EventRelay:
    """Forwards this engine's committed events to every other engine listening on the
    same database, and delivers theirs to ``deliver``. Events are delivered at most
    once: none that were sent while the listening connection was down."""

    def __init__(
        self, url: URL, deliver: Callable[[Event], None], *, connect_timeout: float = 10.0
    ) -> None:
        self._dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._deliver = deliver
        #: seconds to connect, and for the server to answer LISTEN
        self._connect_timeout = connect_timeout
        self.origin = uuid.uuid4().hex
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        #: True while the listening connection is up (for health checks and tests).
        self.connected = False
        #: How many listening connections have been opened, the first included.
        self.connections = 0

    def encode(self, event: Event) -> str:
        """The NOTIFY payload of ``event``; its ``data`` is replaced by
        ``{"truncated": true}`` when the whole would pass PostgreSQL's limit."""
        document: dict[str, Any] = {"origin": self.origin, "event": event.to_dict()}
        payload = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        if len(payload.encode()) > MAX_PAYLOAD_BYTES:
            document["event"]["data"] = {"truncated": True}
            payload = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
        return payload

    async def notify(self, conn: Connection, events: Sequence[Event]) -> None:
        """Queue ``events`` in ``conn``'s transaction: sent when (and if) it commits."""
        if events:
            payloads = [self.encode(event) for event in events]
            await conn.execute(_NOTIFY, {"channel": CHANNEL, "payloads": payloads})

    async def start(self) -> None:
        await self._connect()
        self._supervisor = asyncio.create_task(self._supervise(), name="ctxengine-event-relay")

    async def stop(self) -> None:
        self._stopping = True
        self._lost.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=1.0)
            except DRIVER_ERRORS:
                conn.terminate()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._connect_timeout,
            command_timeout=self._connect_timeout,
            server_settings={"application_name": "ctxengine-events"},
        )
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_terminated)
        self._conn = conn
        self._lost.clear()
        self.connected = True
        self.connections += 1

    def _on_terminated(self, conn: object) -> None:
        self.connected = False
        self._lost.set()

    async def _supervise(self) -> None:
        """Reconnect whenever the listening connection is lost, backing off to 5 s."""
        while not self._stopping:
            await self._lost.wait()
            delay = 0.1
            while not self._stopping:
                try:
                    await self._connect()
                    log.info("event relay reconnected", extra={"channel": CHANNEL})
                    break
                except DRIVER_ERRORS:
                    log.warning(
                        "event relay cannot reconnect; retrying",
                        extra={"channel": CHANNEL, "retry_in": delay},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    def _on_notify(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            document = json.loads(payload)
            if document.get("origin") == self.origin:
                return
            event = Event.model_validate(document["event"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed event notification", extra={"channel": channel})
            return
        self._deliver(event)
