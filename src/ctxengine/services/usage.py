"""Tiers, quotas and usage: the quota check, counter, usage record and touch in one unit."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from .. import validation as v
from ..errors import QuotaExceededError, SessionNotFoundError, ValidationError
from ..ids import new_id
from ..models import Event, QuotaStatus, QuotaType, Session, UsageRecord, UserAnalytics
from ..settings import TierPolicy
from ..storage.connection import Connection
from ..storage.group import SOLO, Combiner, Solo
from ..storage.repositories.leases import LeaseRepository
from ..storage.repositories.quotas import QuotaRepository, QuotaRow, UsageFilter
from .base import Context, Effects, done
from .sessions import SessionService

N = TypeVar("N", int, float)
K = TypeVar("K")

#: A track_usage call: tenant, session_id, operation, resource type, amount, metadata.
_Call = tuple[str, str, str, str, float, dict[str, Any]]

#: Usage thresholds announced once per crossing, in percent.
THRESHOLDS = ((90.0, "quota.critical"), (75.0, "quota.warning"))


def quota_type(value: object, field: str = "resource_type") -> QuotaType:
    """A known :class:`QuotaType`."""
    return v.choice(QuotaType, value, field)


def tier_limit(policy: TierPolicy | None, resource: QuotaType) -> float | None:
    """The limit a tier gives ``resource`` (None = unlimited)."""
    if policy is None:
        return None
    if resource is QuotaType.CONCURRENT_REQUESTS:
        limit = policy.quotas.get(resource, policy.max_concurrent)
    else:
        limit = policy.quotas.get(resource)
    return None if limit is None else float(limit)


def limits_by_tier(
    tiers: Mapping[str, TierPolicy], limit_of: Callable[[TierPolicy, K], N | None], of: K
) -> tuple[tuple[str, N], ...]:
    """(tier, ``limit_of(policy, of)``) of every tier that has that limit, in tier order:
    what a one-statement write turns into a CASE over the session's tier."""
    pairs = ((tier, limit_of(policy, of)) for tier, policy in tiers.items())
    return tuple(sorted((tier, limit) for tier, limit in pairs if limit is not None))


def _row(call: _Call, now: datetime) -> dict[str, Any]:
    """The usage record of ``call`` at ``now`` (a new id), but its user_id."""
    tenant, session_id, operation, resource, amount, metadata = call
    return {
        "tenant_id": tenant,
        "record_id": new_id(),
        "session_id": session_id,
        "operation": operation,
        "resource_type": resource,
        "amount": amount,
        "metadata": metadata,
        "created_at": now,
    }


def _recorded(
    fx: Effects, row: dict[str, Any], user_id: str, used: float, limit: float | None
) -> UsageRecord:
    """The record inserted as ``row``, announced with the quota thresholds it crossed
    (``used`` of ``limit`` after it)."""
    values = {**row, "user_id": user_id, "resource_type": QuotaType(row["resource_type"])}
    record = UsageRecord._trusted({name: values[name] for name in UsageRecord.model_fields})
    session_id = record.session_id
    fx.emit("usage.recorded", row["tenant_id"], session_id, user_id, record=record)
    if limit:
        before, after = 100 * (used - record.amount) / limit, 100 * used / limit
        for threshold, event in THRESHOLDS:
            if before < threshold <= after:
                fx.emit(
                    event,
                    row["tenant_id"],
                    session_id,
                    user_id,
                    resource_type=row["resource_type"],
                    used=used,
                    limit=limit,
                    usage_percentage=after,
                )
                break
    return record


class UsageService:
    """Business rules of SPEC §5 (quotas, usage) and the analytics of §3."""

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = QuotaRepository(ctx.store.backend)
        self.leases = LeaseRepository(ctx.store.backend)
        #: The tier limits of each resource type track_usage counts (the settings are
        #: fixed).
        self._tier_limits = {
            resource.value: limits_by_tier(ctx.settings.tiers, tier_limit, resource)
            for resource in QuotaType
            if resource is not QuotaType.CONCURRENT_REQUESTS
        }
        #: concurrent track_usage calls, written together
        self._tracker: Combiner[_Call, UsageRecord] = Combiner(self._track_many)

    def policy(self, tier: str) -> TierPolicy | None:
        return self.ctx.settings.tiers.get(tier)

    async def track(
        self,
        tenant: str,
        session_id: str,
        operation: str,
        resource_type: Any,
        amount: Any,
        metadata: Any,
    ) -> UsageRecord:
        v.identifier(session_id)
        v.identifier(operation, "operation")
        resource = quota_type(resource_type)
        if resource is QuotaType.CONCURRENT_REQUESTS:
            raise ValidationError(
                "concurrent_requests is a gauge of live leases: use concurrency_slot()",
                field="resource_type",
            )
        qty = v.quantity(amount, "amount")
        meta = v.json_object(metadata, "metadata", self.ctx.settings.max_metadata_bytes)

        call = (tenant, session_id, operation, resource.value, qty, meta)

        async def work(conn: Connection, fx: Effects) -> UsageRecord | None:
            session = await self.sessions.touch_active(conn, fx, tenant, session_id)
            if session is None:
                return None
            limit = tier_limit(self.policy(session.tier), resource)
            counted = await self.repo.add_to_quota(
                conn, tenant, session_id, resource.value, qty, limit
            )
            if counted is None:
                rows = await self.repo.quota_rows(conn, tenant, session_id)
                used, row_limit, _ = rows.get(resource.value, QuotaRow(0.0, limit, False))
                assert row_limit is not None
                fx.emit(
                    "quota.exceeded",
                    tenant,
                    session_id,
                    session.user_id,
                    resource_type=resource.value,
                    used=used,
                    limit=row_limit,
                    requested=qty,
                )
                fx.refuse(QuotaExceededError(resource.value, used, row_limit, qty))
                return None
            row = _row(call, fx.now) | {"user_id": session.user_id}
            await self.repo.insert_record(conn, row)
            return _recorded(fx, row, session.user_id, counted.used, counted.limit)

        with self.ctx.observing("track_usage"):
            tracked = await self._tracker(call)  # group commit (a batch of one at once)
            if not isinstance(tracked, Solo):
                return tracked
            # a call the batch did not write (its session cannot work, or its quota had
            # no room for it): the general transaction refuses it, or finds room freed
            result = await self.ctx.transact(work, operation="track_usage", observed=True)
        return done(result)

    async def _track_many(self, calls: Sequence[_Call]) -> list[UsageRecord | Solo]:
        """track_usage calls written together, in one statement where the backend can
        (``QuotaRepository.track_many``), each announced with its own thresholds; SOLO
        where nothing was written for a call."""

        async def work(conn: Connection, fx: Effects) -> list[UsageRecord | Solo]:
            rows = [_row(call, fx.now) for call in calls]
            written = await self.repo.track_many(conn, rows, self._tier_limits)
            return [
                SOLO if w is None else _recorded(fx, row, w.user_id, w.used, w.limit)
                for row, w in zip(rows, written, strict=True)
            ]

        return await self.ctx.transact(
            work,
            one_statement=self.repo.writes_at_once,
            operation="track_usage",
            observed=True,
        )

    async def quotas(self, tenant: str, session_id: str) -> dict[QuotaType, QuotaStatus]:
        v.identifier(session_id)

        async def work(conn: Connection, fx: Effects) -> dict[QuotaType, QuotaStatus]:
            session = await self.sessions.existing(conn, tenant, session_id, fx.now)
            policy = self.policy(session.tier)
            rows = await self.repo.quota_rows(conn, tenant, session_id)
            live = await self.leases.live_leases(
                conn, tenant, session_id, fx.now, self.ctx.settings.lease_ttl
            )
            result: dict[QuotaType, QuotaStatus] = {}
            for resource in QuotaType:
                used, limit, custom = rows.get(
                    resource.value, QuotaRow(0.0, tier_limit(policy, resource), False)
                )
                if resource is QuotaType.CONCURRENT_REQUESTS:
                    used = float(live)
                    if not custom:
                        limit = tier_limit(policy, resource)
                result[resource] = QuotaStatus.of(used, limit)
            return result

        return await self.ctx.transact(work, write=False, operation="get_quota")

    async def set_quota(
        self, tenant: str, session_id: str, resource_type: Any, limit: Any
    ) -> QuotaStatus:
        v.identifier(session_id)
        resource = quota_type(resource_type)
        if limit is not None:
            limit = v.quantity(limit, "limit", zero=True)

        async def work(conn: Connection, fx: Effects) -> None:
            await self.sessions.existing(conn, tenant, session_id, fx.now)
            await self.repo.set_quota(conn, tenant, session_id, resource.value, limit)

        await self.ctx.transact(work, operation="set_quota")
        return (await self.quotas(tenant, session_id))[resource]

    async def change_tier(self, tenant: str, session_id: str, tier: str) -> Session:
        v.identifier(session_id)
        policy = self.ctx.settings.tiers[v.tier(tier, self.ctx.settings.tiers)]

        async def work(conn: Connection, fx: Effects) -> Session:
            session = await self.sessions.repo.set_tier(conn, tenant, session_id, tier, fx.now)
            if session is None:
                raise SessionNotFoundError(session_id, tenant)
            limits = {q.value: tier_limit(policy, q) for q in QuotaType}
            await self.repo.retier_quotas(conn, tenant, session_id, limits)
            return session

        return await self.ctx.transact(work, operation="change_tier")

    async def history(
        self,
        tenant: str,
        *,
        user_id: str | None,
        session_id: str | None,
        resource_type: Any,
        operation: str | None,
        since: datetime | None,
        limit: int,
    ) -> list[UsageRecord]:
        f = UsageFilter(
            user_id=v.optional_identifier(user_id, "user_id"),
            session_id=v.optional_identifier(session_id, "session_id"),
            resource_type=None if resource_type is None else quota_type(resource_type).value,
            operation=v.optional_identifier(operation, "operation"),
            since=v.optional_aware(since, "since"),
        )
        v.limit(limit)

        async def work(conn: Connection, fx: Effects) -> list[UsageRecord]:
            return await self.repo.history(conn, tenant, f, limit)

        return await self.ctx.transact(work, write=False, operation="get_usage_history")

    async def predict(
        self, tenant: str, session_id: str, lookback: Any
    ) -> dict[QuotaType, dict[str, Any]]:
        seconds = v.seconds(lookback, "lookback")
        status = await self.quotas(tenant, session_id)
        now = self.ctx.clock()

        async def work(conn: Connection, fx: Effects) -> dict[str, float]:
            since = now - timedelta(seconds=seconds)
            return await self.repo.amounts_since(conn, tenant, session_id, since)

        amounts = await self.ctx.transact(work, write=False, operation="predict")
        result: dict[QuotaType, dict[str, Any]] = {}
        for resource, quota in status.items():
            if resource is QuotaType.CONCURRENT_REQUESTS:
                continue
            rate = amounts.get(resource.value, 0.0) * 3600.0 / seconds
            when: datetime | None = None
            hours: float | None = None
            if rate > 0 and quota.remaining is not None:
                hours = quota.remaining / rate
                when = now + timedelta(hours=hours) if math.isfinite(hours) else None
            result[resource] = {
                "rate_per_hour": rate,
                "remaining": quota.remaining,
                "hours_to_exhaustion": hours,
                "predicted_exhaustion": when,
            }
        return result

    async def analytics(self, tenant: str, user_id: str) -> UserAnalytics:
        v.identifier(user_id, "user_id")

        async def work(conn: Connection, fx: Effects) -> UserAnalytics:
            total, active = await self.sessions.repo.user_counts(conn, tenant, user_id)
            ops, resources = await self.repo.user_breakdown(conn, tenant, user_id)
            most = min(ops, key=lambda op: (-ops[op], op)) if ops else None
            return UserAnalytics(
                user_id=user_id,
                total_sessions=total,
                active_sessions=active,
                total_operations=sum(ops.values()),
                operation_breakdown=ops,
                resource_usage={QuotaType(k): val for k, val in resources.items()},
                most_used_operation=most,
            )

        return await self.ctx.transact(work, write=False, operation="get_user_analytics")


def usage_callback(callback: Callable[[UsageRecord], Any]) -> Callable[[Any], Any]:
    """Adapt a ``callback(record)`` into an event handler for ``usage.recorded``."""

    def handler(event: Event) -> Any:
        record = usage_of(event)
        return None if record is None else callback(record)

    return handler


def usage_of(event: Event) -> UsageRecord | None:
    """The record a ``usage.recorded`` event carries (also when it came from another
    engine, as plain data)."""
    record = event.data.get("record")
    if isinstance(record, UsageRecord):
        return record
    return UsageRecord.model_validate(record) if isinstance(record, dict) else None
