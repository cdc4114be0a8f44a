"""Concurrency caps (leases that expire unless renewed) and rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from .. import validation as v
from ..errors import (
    ConcurrencyLimitError,
    ContextEngineError,
    RateLimitError,
    ValidationError,
)
from ..ids import new_id
from ..models import QuotaType, RateLimitStatus, RateLimitType, Session
from ..ratelimit import LimiterState, decide
from ..settings import TierPolicy
from ..storage.connection import Connection
from ..storage.group import Combiner
from ..storage.repositories.leases import LeaseRepository
from ..storage.repositories.quotas import QuotaRepository
from ..storage.repositories.rate_limits import RateLimitRepository
from ..storage.repositories.sessions import Worker
from .base import Context, Effects
from .sessions import SessionService
from .usage import limits_by_tier, tier_limit

log = logging.getLogger("ctxengine.limits")


#: Work in a unit of work, on a session that can work (touched in it); a refusal is
#: left in the effects.
Admission = Callable[[Connection, Effects, Worker], Awaitable[None]]

#: What a call under no limit is told.
_UNLIMITED = RateLimitStatus(limit=None, remaining=None, reset_after=0.0)


class LeaseService:
    """Concurrency slots: a lease row per running operation, live until ``expires_at``.

    Acquiring locks the session row (the guarded touch), then counts the live leases
    in a new statement, so concurrent acquirers across processes never exceed the cap.
    Holders renew their lease every ``lease_ttl / 3`` seconds; a process that dies
    leaks its slot for at most ``lease_ttl``. A lease expiring more than ``lease_ttl``
    (+ ``CLOCK_SKEW``) ahead of the clock was stamped before the clock stepped back: it
    is dead (a dead holder's slot frees at once; a live holder renews it, unless an
    acquirer dropped it first, and then holds no lease until it releases).
    """

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = LeaseRepository(ctx.store.backend)
        self.quotas = QuotaRepository(ctx.store.backend)
        #: Leases held by this engine: (tenant, lease_id) → renewal task.
        self.held: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: manage_concurrency() leases: (tenant, session, operation) → lease ids.
        self.manual: dict[tuple[str, str, str], list[str]] = {}
        #: concurrent releases, written together (group commit)
        self._releaser: Combiner[tuple[str, str], None] = Combiner(self._release_many)

    @property
    def ttl(self) -> float:
        return self.ctx.settings.lease_ttl

    async def acquire(
        self,
        tenant: str,
        session_id: str,
        operation: str,
        also: Admission | None = None,
        *,
        unit: str = "acquire_concurrency_slot",
    ) -> str:
        """Take a slot (raises ConcurrencyLimitError at the cap) and keep it renewed.
        ``also`` runs in the same transaction (``unit`` names it) once the slot is
        taken: a refusal of its own gives the slot back with everything else."""
        v.identifier(session_id)
        v.identifier(operation, "operation")
        lease_id = new_id()

        async def work(conn: Connection, fx: Effects) -> None:
            session = await self.sessions.touch_active(conn, fx, tenant, session_id)
            if session is None:
                return
            custom, limit = await self.quotas.custom_limit(
                conn, tenant, session_id, QuotaType.CONCURRENT_REQUESTS.value
            )
            if not custom:
                policy = self.ctx.settings.tiers.get(session.tier)
                limit = tier_limit(policy, QuotaType.CONCURRENT_REQUESTS)
            await self.repo.drop_dead_leases(conn, tenant, session_id, fx.now, self.ttl)
            if limit is not None:
                live = await self.repo.live_leases(conn, tenant, session_id, fx.now, self.ttl)
                if live >= limit:
                    fx.emit(
                        "rate_limit.exceeded",
                        tenant,
                        session_id,
                        session.user_id,
                        operation=operation,
                        kind="concurrency",
                        limit=limit,
                    )
                    fx.refuse(ConcurrencyLimitError(session_id, int(limit), operation))
                    return
            await self.repo.insert_lease(
                conn,
                {
                    "tenant_id": tenant,
                    "lease_id": lease_id,
                    "session_id": session_id,
                    "operation": operation,
                    "acquired_at": fx.now,
                    "expires_at": fx.now + timedelta(seconds=self.ttl),
                },
            )
            if also is not None:
                await also(conn, fx, session)

        await self.ctx.transact(work, operation=unit)
        self.held[(tenant, lease_id)] = asyncio.create_task(
            self._renew_forever(tenant, lease_id), name=f"ctxengine-lease-{lease_id}"
        )
        return lease_id

    async def _renew_forever(self, tenant: str, lease_id: str) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await self._renew(tenant, lease_id):
                    return  # released elsewhere (the session ended or expired)
            except ContextEngineError:
                log.warning(
                    "lease renewal failed; retrying",
                    exc_info=True,
                    extra={"tenant_id": tenant, "lease_id": lease_id},
                )

    async def _renew(self, tenant: str, lease_id: str) -> bool:
        async def work(conn: Connection, fx: Effects) -> bool:
            return await self.repo.renew_lease(conn, tenant, lease_id, fx.now, self.ttl)

        return await self.ctx.transact(work, one_statement=True, operation="renew_lease")

    async def release(self, tenant: str, lease_id: str) -> None:
        """Stop renewing and free the slot."""
        task = self.held.pop((tenant, lease_id), None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        await self._releaser((tenant, lease_id))

    async def _release_many(self, keys: Sequence[tuple[str, str]]) -> list[None]:
        """Free the slots (tenant, lease_id) ``keys`` in one statement."""

        async def work(conn: Connection, fx: Effects) -> None:
            await self.repo.release_leases(conn, keys)

        await self.ctx.transact(work, one_statement=True, operation="release_concurrency_slot")
        return [None] * len(keys)

    async def release_quietly(self, tenant: str, lease_id: str) -> None:
        """Release, even when cancelled; a failure is logged (the lease then expires
        by itself within ``lease_ttl``) instead of hiding the caller's exception."""
        try:
            await asyncio.shield(self.release(tenant, lease_id))
        except ContextEngineError:
            log.warning(
                "could not release a lease; it expires by itself",
                exc_info=True,
                extra={"tenant_id": tenant, "lease_id": lease_id},
            )

    async def live(self, tenant: str, session_id: str) -> int:
        async def work(conn: Connection, fx: Effects) -> int:
            return await self.repo.live_leases(conn, tenant, session_id, fx.now, self.ttl)

        return await self.ctx.transact(work, write=False, operation="count_leases")

    @asynccontextmanager
    async def slot(self, tenant: str, session_id: str, operation: str) -> AsyncIterator[str]:
        lease_id = await self.acquire(tenant, session_id, operation)
        try:
            yield lease_id
        finally:
            await self.release_quietly(tenant, lease_id)

    async def manage(self, tenant: str, session_id: str, operation: str, increment: bool) -> int:
        key = (tenant, v.identifier(session_id), v.identifier(operation, "operation"))
        if increment:
            self.manual.setdefault(key, []).append(
                await self.acquire(tenant, session_id, operation)
            )
        elif self.manual.get(key):
            await self.release(tenant, self.manual[key].pop())
        return await self.live(tenant, session_id)

    async def release_all(self) -> None:
        """Free every lease this engine holds (on close)."""
        for tenant, lease_id in list(self.held):
            await self.release_quietly(tenant, lease_id)
        self.manual.clear()


#: Window length of each standard rate-limit type, in seconds.
WINDOWS: dict[RateLimitType, float] = {
    RateLimitType.PER_SECOND: 1.0,
    RateLimitType.PER_MINUTE: 60.0,
    RateLimitType.PER_HOUR: 3600.0,
    RateLimitType.PER_DAY: 86400.0,
}

_Key = tuple[str, str, str, str, int]


def _rate_limit(policy: TierPolicy, limit_type: RateLimitType) -> int | None:
    return policy.rate_limits.get(limit_type)


class RateLimitService:
    """Rate limits with the sub-window rule of :mod:`ctxengine.ratelimit`, applied to the
    limiter state row under its row lock (PostgreSQL) or SQLite's write lock."""

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = RateLimitRepository(ctx.store.backend)
        #: Each limit type's tier limits (the settings are fixed).
        self._tier_limits = {
            limit_type: limits_by_tier(ctx.settings.tiers, _rate_limit, limit_type)
            for limit_type in RateLimitType
        }

    async def _rules(
        self,
        conn: Connection,
        tenant: str,
        session: Session | Worker,
        operation: str,
        limit_types: Sequence[RateLimitType],
    ) -> list[tuple[_Key, int, float]]:
        """The limits that apply: a custom rule of the session, else of its user, else
        the tier's rule for each of ``limit_types`` (unlimited ones are left out)."""
        rule = await self.repo.rule(conn, tenant, session.session_id, session.user_id, operation)
        if rule is not None:
            scope, window = rule.scope, rule.window_seconds
            subject = session.session_id if scope == "session" else session.user_id
            key = (tenant, scope, subject, operation, round(window * 1000))
            return [(key, rule.max_calls, window)]
        policy = self.ctx.settings.tiers.get(session.tier)
        rules = []
        for limit_type in limit_types:
            tier_max = None if policy is None else policy.rate_limits.get(limit_type)
            if tier_max is not None:
                window = WINDOWS[limit_type]
                key = (tenant, "session", session.session_id, operation, round(window * 1000))
                rules.append((key, tier_max, window))
        return rules

    async def admit(
        self,
        conn: Connection,
        fx: Effects,
        tenant: str,
        session: Session | Worker,
        operation: str,
        limit_types: Sequence[RateLimitType],
        cost: int,
        *,
        consume: bool,
    ) -> RateLimitStatus:
        """Apply every limit that applies, all or nothing; a refusal is left in ``fx``."""
        best = _UNLIMITED
        decisions = []
        for key, max_calls, window in await self._rules(
            conn, tenant, session, operation, limit_types
        ):
            if cost > max_calls:
                raise ValidationError(
                    f"cost {cost} is above the limit of {max_calls} calls per {window:g}s: "
                    "it could never be admitted",
                    field="cost",
                )
            raw = await (
                self.repo.lock_state(conn, key, fx.now)
                if consume
                else self.repo.peek_state(conn, key)
            )
            # The decision's instant is read once the state is locked, so admissions
            # are stamped in the order they are made.
            now = self.ctx.clock().timestamp()
            decision = decide(
                LimiterState.from_json(raw), now, max_calls, window, cost, consume=consume
            )
            if not decision.allowed:
                if consume:
                    fx.emit(
                        "rate_limit.exceeded",
                        tenant,
                        session.session_id,
                        session.user_id,
                        operation=operation,
                        limit=max_calls,
                        window=window,
                        retry_after=decision.retry_after,
                    )
                    fx.refuse(RateLimitError(decision.retry_after, max_calls, window, operation))
                return RateLimitStatus(
                    limit=max_calls, remaining=0, reset_after=decision.retry_after
                )
            decisions.append((key, decision))
            if best.remaining is None or decision.remaining < best.remaining:
                best = RateLimitStatus(
                    limit=max_calls,
                    remaining=decision.remaining,
                    reset_after=decision.reset_after,
                )
        if consume:
            for key, decision in decisions:
                await self.repo.save_state(conn, key, decision.state.to_json(), fx.now)
        return best

    async def enforce(
        self,
        tenant: str,
        session_id: str,
        operation: str,
        limit_type: Any,
        cost: Any,
        *,
        consume: bool,
    ) -> RateLimitStatus:
        v.identifier(session_id)
        v.identifier(operation, "operation")
        types = [v.choice(RateLimitType, limit_type, "limit_type")]
        units = v.whole(cost, "cost")

        if consume and self.repo.writes_at_once:
            # one statement when the call is admitted; refusals (and the rare call the
            # statement cannot decide) take the general transaction below
            limit_type = types[0]
            tier_limits = self._tier_limits[limit_type]

            async def take(conn: Connection, fx: Effects) -> RateLimitStatus | None:
                now = fx.now.timestamp()
                taken = await self.repo.take(
                    conn,
                    (tenant, session_id, operation),
                    units,
                    fx.now,
                    tier_limits,
                    WINDOWS[limit_type],
                )
                if taken is None:
                    return None
                if taken.max_calls is None or taken.window_seconds is None:
                    return _UNLIMITED  # no limit applies (the session was touched)
                # the new state, peeked at the same instant: what is left, and when the
                # oldest counted sub-window stops counting
                after = decide(
                    LimiterState.from_json(taken.state),
                    now,
                    taken.max_calls,
                    taken.window_seconds,
                    units,
                    consume=False,
                )
                return RateLimitStatus._trusted(
                    {
                        "limit": taken.max_calls,
                        "remaining": after.remaining,
                        "reset_after": after.reset_after,
                    }
                )

            taken = await self.ctx.transact(
                take, one_statement=True, operation="enforce_rate_limit"
            )
            if taken is not None:
                return taken

        async def work(conn: Connection, fx: Effects) -> RateLimitStatus | None:
            session: Session | Worker | None
            if consume:
                session = await self.sessions.touch_active(conn, fx, tenant, session_id)
            else:
                session = await self.sessions.peek_active(conn, fx, tenant, session_id)
            if session is None:
                return None
            return await self.admit(
                conn, fx, tenant, session, operation, types, units, consume=consume
            )

        result = await self.ctx.transact(
            work, write=consume, operation="enforce_rate_limit" if consume else "check_rate_limit"
        )
        assert result is not None
        return result

    def consume_all(self, tenant: str, operation: str) -> Admission:
        """Work consuming one call of every limit that applies to ``operation`` on a
        session that can work (track_request's, in the transaction taking its slot)."""

        async def consume(conn: Connection, fx: Effects, session: Worker) -> None:
            await self.admit(
                conn, fx, tenant, session, operation, list(RateLimitType), 1, consume=True
            )

        return consume

    async def set_rule(
        self,
        tenant: str,
        session_id: str | None,
        user_id: str | None,
        operation: str,
        max_calls: Any,
        window_seconds: Any,
    ) -> None:
        if (session_id is None) == (user_id is None):
            raise ValidationError("give exactly one of session_id and user_id", field="session_id")
        v.identifier(operation, "operation")
        v.whole(max_calls, "max_calls")
        window = v.seconds(window_seconds, "window_seconds")
        scope, subject = (
            ("session", v.identifier(session_id))
            if session_id is not None
            else ("user", v.identifier(user_id, "user_id"))
        )

        async def work(conn: Connection, fx: Effects) -> None:
            if scope == "session":
                await self.sessions.existing(conn, tenant, subject, fx.now)
            await self.repo.set_rule(conn, tenant, scope, subject, operation, max_calls, window)

        await self.ctx.transact(work, operation="set_rate_limit")
