"""The session API, bound to one tenant. ``ContextEngine`` is the view of "default"."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any, overload

from . import validation as v
from .errors import EngineClosedError, ValidationError
from .events import EVENT_TYPES, EventStream, Handler
from .lifecycle import END_STATUSES
from .models import (
    QuotaStatus,
    QuotaType,
    RateLimitStatus,
    RateLimitType,
    Session,
    SessionStatus,
    Statistics,
    UsageRecord,
    UserAnalytics,
)
from .services.usage import quota_type, usage_callback
from .tracking import RequestTracker, track_request

if TYPE_CHECKING:
    from .engine import ContextEngine, _Runtime

#: Capacity of an ``events()`` stream before the oldest events are dropped.
STREAM_CAPACITY = 1000


def _event_types(types: Sequence[str]) -> tuple[str, ...]:
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown:
        raise ValidationError(
            f"unknown event types {unknown}; known: {', '.join(sorted(EVENT_TYPES))}",
            field="event_types",
        )
    return tuple(types)


class TenantView:
    """Every session call, confined to one tenant: reads, writes, counts and expiry
    never see another tenant's rows. Get one with ``engine.tenant("acme")``."""

    def __init__(self, engine: ContextEngine, tenant_id: str) -> None:
        self._engine = engine
        self._tenant = v.identifier(tenant_id, "tenant_id")

    @property
    def tenant_id(self) -> str:
        """The tenant this view reads and writes."""
        return self._tenant

    def _runtime(self) -> _Runtime:
        runtime = self._engine._live
        if runtime is None:
            raise EngineClosedError(self._engine._state)
        return runtime

    def tenant(self, tenant_id: str) -> TenantView:
        """A view of the same engine confined to ``tenant_id``."""
        return TenantView(self._engine, tenant_id)

    # -- sessions -----------------------------------------------------------------------
    async def create_session(
        self,
        session_id: str | None = None,
        user_id: str | None = None,
        *,
        tier: str = "free",
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        tags: Sequence[str] | None = None,
        preferences: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
    ) -> Session:
        """Create an active session (a time-ordered id is generated when none is given).

        Raises SessionExistsError, SessionLimitError, ValidationError."""
        if user_id is None:
            raise ValidationError("user_id is required", field="user_id")
        return await self._runtime().sessions.create(
            self._tenant,
            session_id,
            user_id,
            tier=tier,
            metadata=metadata,
            name=name,
            tags=tags,
            preferences=preferences,
            expires_at=expires_at,
        )

    async def get_or_create_session(self, session_id: str, user_id: str, **kw: Any) -> Session:
        """The session with this id, created (with ``kw``) if it does not exist yet."""
        v.identifier(session_id)
        return await self._runtime().sessions.create(
            self._tenant, session_id, user_id, exist_ok=True, **kw
        )

    async def get_session(self, session_id: str) -> Session | None:
        """The stored session, or None. Never changes state."""
        return await self._runtime().sessions.get(self._tenant, session_id)

    async def update_session(
        self,
        session_id: str,
        *,
        increment_requests: bool = False,
        add_processing_time: float = 0.0,
        mark_error: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> Session:
        """Add to the counters and merge ``metadata`` atomically; touches last_activity.

        The session must be active (SessionNotActiveError, SessionExpiredError)."""
        return await self._runtime().sessions.record(
            self._tenant,
            session_id,
            requests=int(bool(increment_requests)),
            errors=int(bool(mark_error)),
            processing_time=add_processing_time,
            metadata=metadata,
        )

    async def touch(self, session_id: str) -> Session:
        """Record activity on an active session."""
        return await self._runtime().sessions.record(self._tenant, session_id, operation="touch")

    async def pause_session(self, session_id: str) -> Session:
        """active → paused."""
        return await self._runtime().sessions.transition(
            self._tenant, session_id, SessionStatus.PAUSED
        )

    async def resume_session(self, session_id: str) -> Session:
        """paused → active."""
        return await self._runtime().sessions.transition(
            self._tenant, session_id, SessionStatus.ACTIVE
        )

    async def end_session(
        self, session_id: str, status: SessionStatus | str = SessionStatus.COMPLETED
    ) -> Session:
        """Move to completed, failed or expired (final). Ending again with the same
        status returns the session unchanged."""
        target = v.end_status(status)
        return await self._runtime().sessions.transition(self._tenant, session_id, target)

    async def delete_session(self, session_id: str) -> bool:
        """Remove the session and everything it owns; False when it did not exist."""
        return await self._runtime().sessions.delete(self._tenant, session_id)

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> list[Session]:
        """One page of sessions, newest first. ``cursor`` is the ``session_id`` of the
        last session of the previous page (keyset paging)."""
        f = self._runtime().sessions.make_filter(
            user_id, status, tier, tags, created_after, created_before, idle_for
        )
        return await self._runtime().sessions.page(self._tenant, f, limit, cursor)

    async def iter_sessions(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> AsyncIterator[Session]:
        """Every matching session, newest first, fetched ``limit`` at a time."""
        sessions = self._runtime().sessions
        f = sessions.make_filter(
            user_id, status, tier, tags, created_after, created_before, idle_for
        )
        async for session in sessions.iterate(self._tenant, f, limit, cursor):
            yield session

    async def count_sessions(
        self,
        *,
        user_id: str | None = None,
        status: SessionStatus | str | None = None,
        tier: str | None = None,
        tags: Sequence[str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        idle_for: float | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> int:
        """How many sessions match the filters (``limit`` and ``cursor`` are ignored)."""
        sessions = self._runtime().sessions
        f = sessions.make_filter(
            user_id, status, tier, tags, created_after, created_before, idle_for
        )
        return await sessions.count(self._tenant, f)

    async def get_user_sessions(self, user_id: str) -> list[Session]:
        """Every session of ``user_id``, newest first."""
        sessions = self._runtime().sessions
        f = sessions.make_filter(user_id=v.identifier(user_id, "user_id"))
        return await sessions.page(self._tenant, f, None, None)

    async def cleanup_inactive_sessions(self, max_idle_seconds: float | None = None) -> int:
        """Expire every active or paused session idle longer than ``max_idle_seconds``
        (default: the session timeout) or past its ``expires_at``; the number expired."""
        return await self._runtime().sessions.expire_stale(self._tenant, max_idle_seconds)

    async def purge_sessions(
        self,
        *,
        ended_before: datetime,
        statuses: Sequence[SessionStatus | str] = tuple(sorted(END_STATUSES)),
    ) -> int:
        """Delete ended sessions whose end is older than ``ended_before``; the number deleted."""
        return await self._runtime().sessions.purge(self._tenant, ended_before, statuses)

    # -- requests and metrics -----------------------------------------------------------
    def track_request(
        self, session_id: str, operation: str = "request"
    ) -> AbstractAsyncContextManager[RequestTracker]:
        """``async with``: check the session can work, then count one request, its time,
        and an error if the block raised (the exception propagates)."""
        self._runtime()
        return track_request(self, session_id, operation)

    async def get_statistics(self) -> Statistics:
        """Aggregates over this tenant's sessions, computed in SQL."""
        return await self._runtime().sessions.statistics(self._tenant)

    async def get_metrics(self) -> dict[str, Any]:
        """``get_statistics()`` as a dict."""
        return (await self.get_statistics()).model_dump(mode="json")

    # -- tiers, quotas, usage ------------------------------------------------------------
    async def track_usage(
        self,
        session_id: str,
        operation: str,
        resource_type: QuotaType | str,
        amount: float = 1,
        metadata: dict[str, Any] | None = None,
    ) -> UsageRecord:
        """Record use of a resource: the quota check, the counter, the usage record and
        the session touch in one transaction. Raises QuotaExceededError (writing
        nothing) when ``used + amount`` would pass the limit."""
        return await self._runtime().usage.track(
            self._tenant, session_id, operation, resource_type, amount, metadata
        )

    @overload
    async def get_quota(self, session_id: str) -> dict[QuotaType, QuotaStatus]: ...

    @overload
    async def get_quota(self, session_id: str, resource_type: QuotaType | str) -> QuotaStatus: ...

    async def get_quota(
        self, session_id: str, resource_type: QuotaType | str | None = None
    ) -> dict[QuotaType, QuotaStatus] | QuotaStatus:
        """Every quota of the session, or the one of ``resource_type``."""
        quotas = await self._runtime().usage.quotas(self._tenant, session_id)
        if resource_type is None:
            return quotas
        return quotas[quota_type(resource_type)]

    async def set_quota(
        self, session_id: str, resource_type: QuotaType | str, limit: float | None
    ) -> QuotaStatus:
        """Give the session its own limit for ``resource_type`` (None = unlimited); usage
        so far is kept and the limit survives change_tier()."""
        return await self._runtime().usage.set_quota(self._tenant, session_id, resource_type, limit)

    async def change_tier(self, session_id: str, tier: str) -> Session:
        """Move the session to another tier; its limits change now, usage is kept."""
        return await self._runtime().usage.change_tier(self._tenant, session_id, tier)

    async def get_usage_history(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        resource_type: QuotaType | str | None = None,
        operation: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[UsageRecord]:
        """Usage records, newest first."""
        return await self._runtime().usage.history(
            self._tenant,
            user_id=user_id,
            session_id=session_id,
            resource_type=resource_type,
            operation=operation,
            since=since,
            limit=limit,
        )

    async def predict_quota_exhaustion(
        self, session_id: str, *, lookback: float = 3600
    ) -> dict[QuotaType, dict[str, Any]]:
        """Per quota type: the consumption rate per hour over ``lookback`` seconds, what
        remains, and when it runs out at that rate (None when the rate is 0 or the
        quota unlimited)."""
        return await self._runtime().usage.predict(self._tenant, session_id, lookback)

    async def get_user_analytics(self, user_id: str) -> UserAnalytics:
        """Sessions and usage of one user, from SQL aggregates."""
        return await self._runtime().usage.analytics(self._tenant, user_id)

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> Callable[[], None]:
        """Call ``callback(record)`` after each recorded usage; returns the unsubscriber."""
        return self.subscribe(usage_callback(callback), "usage.recorded")

    # -- rate limits ----------------------------------------------------------------------
    async def enforce_rate_limit(
        self,
        session_id: str,
        operation: str = "default",
        limit_type: RateLimitType | str = RateLimitType.PER_MINUTE,
        cost: int = 1,
    ) -> RateLimitStatus:
        """Consume ``cost`` calls, or raise RateLimitError (consuming nothing). The limit
        is the custom one set for ``operation`` (session, then user), else the tier's
        rule for ``limit_type``."""
        return await self._runtime().rates.enforce(
            self._tenant, session_id, operation, limit_type, cost, consume=True
        )

    async def check_rate_limit(
        self,
        session_id: str,
        operation: str = "default",
        limit_type: RateLimitType | str = RateLimitType.PER_MINUTE,
        cost: int = 1,
    ) -> RateLimitStatus:
        """What enforce_rate_limit would say, without consuming or raising for the limit
        (``remaining`` 0 and ``reset_after`` = the wait when it would refuse)."""
        return await self._runtime().rates.enforce(
            self._tenant, session_id, operation, limit_type, cost, consume=False
        )

    async def set_rate_limit(
        self,
        session_id: str | None,
        operation: str,
        max_calls: int,
        window_seconds: float,
        *,
        user_id: str | None = None,
    ) -> None:
        """A custom limit for ``operation``: ``max_calls`` per ``window_seconds`` for one
        session, or (``session_id=None, user_id=...``) shared by a user's sessions. It
        replaces the tier's rules for that operation."""
        await self._runtime().rates.set_rule(
            self._tenant, session_id, user_id, operation, max_calls, window_seconds
        )

    # -- concurrency ----------------------------------------------------------------------
    def concurrency_slot(
        self, session_id: str, operation: str = "default"
    ) -> AbstractAsyncContextManager[str]:
        """``async with``: hold one of the session's concurrency slots while the block
        runs (ConcurrencyLimitError at the cap). The lease is renewed while held and
        expires ``lease_ttl`` seconds after its holder dies."""
        return self._runtime().leases.slot(self._tenant, session_id, operation)

    async def manage_concurrency(
        self, session_id: str, operation: str = "default", increment: bool = True
    ) -> int:
        """Take (``increment=True``) or give back a slot; the number of live leases after."""
        return await self._runtime().leases.manage(self._tenant, session_id, operation, increment)

    # -- events -------------------------------------------------------------------------
    def subscribe(self, handler: Handler, *event_types: str) -> Callable[[], None]:
        """Call ``handler(event)`` after each committed change of this tenant (all types
        when none are named); returns the function that unsubscribes."""
        return self._runtime().ctx.bus.subscribe(
            handler, _event_types(event_types), self._tenant_filter()
        )

    def events(self, *event_types: str, session_id: str | None = None) -> EventStream:
        """An async iterator of events (bounded: the oldest are dropped when the reader
        falls behind); it ends when the engine closes."""
        return self._runtime().ctx.bus.stream(
            _event_types(event_types), self._tenant_filter(), session_id, STREAM_CAPACITY
        )

    def _tenant_filter(self) -> str | None:
        return self._tenant
