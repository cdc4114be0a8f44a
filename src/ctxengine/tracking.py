"""``track_request``: the one-line integration for an agent call."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING

from . import validation as v
from .errors import ContextEngineError

if TYPE_CHECKING:
    from .clock import Clock
    from .runtime import Runtime

log = logging.getLogger("ctxengine.tracking")


class RequestTracker:
    """Handle of a tracked request; ``elapsed`` is readable inside the block."""

    def __init__(self, clock: Clock, session_id: str, operation: str, started: datetime):
        self._clock = clock
        self.session_id = session_id
        self.operation = operation
        self.started_at = started
        self.failed = False

    @property
    def elapsed(self) -> float:
        """Seconds since the request started, by the engine's clock."""
        return max((self._clock() - self.started_at).total_seconds(), 0.0)


@asynccontextmanager
async def track_request(
    runtime: Runtime, tenant: str, session_id: str, operation: str
) -> AsyncIterator[RequestTracker]:
    """Check the session can work, take a concurrency slot and a call of its rate
    limits (one transaction), run the block, then add one request and its time (and an
    error when the block raised; it propagates)."""
    v.identifier(session_id)
    v.identifier(operation, "operation")
    lease_id = await runtime.leases.acquire(
        tenant,
        session_id,
        operation,
        runtime.rates.consume_all(tenant, operation),
        unit="track_request",
    )
    try:
        tracker = RequestTracker(runtime.ctx.clock, session_id, operation, runtime.ctx.clock())
        try:
            yield tracker
        except BaseException:
            tracker.failed = True
            try:
                await runtime.sessions.record(
                    tenant,
                    session_id,
                    requests=1,
                    errors=1,
                    processing_time=tracker.elapsed,
                    require_active=False,
                    operation="track_request",
                )
            except ContextEngineError:  # never hide the caller's exception behind ours
                log.warning(
                    "could not record a failed request",
                    exc_info=True,
                    extra={"session_id": session_id},
                )
            raise
        await runtime.sessions.record(
            tenant,
            session_id,
            requests=1,
            processing_time=tracker.elapsed,
            require_active=False,
            operation="track_request",
        )
    finally:
        await runtime.leases.release_quietly(tenant, lease_id)
