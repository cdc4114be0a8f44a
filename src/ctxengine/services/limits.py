"""Concurrency caps (leases that expire unless renewed) and rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from .. import validation as v
from ..errors import ConcurrencyLimitError, ContextEngineError
from ..ids import new_id
from ..models import QuotaType
from ..storage.repositories.usage import UsageRepository
from .base import Context, Effects
from .sessions import SessionService
from .usage import tier_limit

log = logging.getLogger("ctxengine.limits")


class LeaseService:
    """Concurrency slots: a lease row per running operation, live until ``expires_at``.

    Acquiring locks the session row (the guarded touch), then counts the live leases
    in a new statement, so concurrent acquirers across processes never exceed the cap.
    Holders renew their lease every ``lease_ttl / 3`` seconds; a process that dies
    leaks its slot for at most ``lease_ttl``.
    """

    def __init__(self, ctx: Context, sessions: SessionService) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.repo = UsageRepository(ctx.store.backend)
        #: Leases held by this engine: (tenant, lease_id) → renewal task.
        self.held: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: manage_concurrency() leases: (tenant, session, operation) → lease ids.
        self.manual: dict[tuple[str, str, str], list[str]] = {}

    @property
    def ttl(self) -> float:
        return self.ctx.settings.lease_ttl

    async def acquire(self, tenant: str, session_id: str, operation: str) -> str:
        """Take a slot (raises ConcurrencyLimitError at the cap) and keep it renewed."""
        v.identifier(session_id)
        v.identifier(operation, "operation")
        lease_id = new_id()

        async def work(conn: AsyncConnection, fx: Effects) -> None:
            session = await self.sessions.require_active(conn, fx, tenant, session_id)
            if session is None:
                return
            custom, limit = await self.repo.custom_limit(
                conn, tenant, session_id, QuotaType.CONCURRENT_REQUESTS.value
            )
            if not custom:
                policy = self.ctx.settings.tiers.get(session.tier)
                limit = tier_limit(policy, QuotaType.CONCURRENT_REQUESTS)
            await self.repo.drop_dead_leases(conn, tenant, session_id, fx.now)
            if limit is not None:
                live = await self.repo.live_leases(conn, tenant, session_id, fx.now)
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

        await self.ctx.transact(work, operation="acquire concurrency slot")
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
                log.warning("lease renewal failed; retrying", exc_info=True)

    async def _renew(self, tenant: str, lease_id: str) -> bool:
        async def work(conn: AsyncConnection, fx: Effects) -> bool:
            return await self.repo.renew_lease(conn, tenant, lease_id, fx.now, self.ttl)

        return await self.ctx.transact(work, operation="renew lease")

    async def release(self, tenant: str, lease_id: str) -> None:
        """Stop renewing and free the slot."""
        task = self.held.pop((tenant, lease_id), None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        async def work(conn: AsyncConnection, fx: Effects) -> None:
            await self.repo.release_lease(conn, tenant, lease_id)

        await self.ctx.transact(work, operation="release concurrency slot")

    async def live(self, tenant: str, session_id: str) -> int:
        async def work(conn: AsyncConnection, fx: Effects) -> int:
            return await self.repo.live_leases(conn, tenant, session_id, fx.now)

        return await self.ctx.transact(work, write=False, operation="count leases")

    @asynccontextmanager
    async def slot(self, tenant: str, session_id: str, operation: str) -> AsyncIterator[str]:
        lease_id = await self.acquire(tenant, session_id, operation)
        try:
            yield lease_id
        finally:
            await asyncio.shield(self.release(tenant, lease_id))

    async def manage(self, tenant: str, session_id: str, operation: str, increment: bool) -> int:
        key = (tenant, session_id, operation)
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
            try:
                await self.release(tenant, lease_id)
            except ContextEngineError:
                log.warning("could not release a lease on close", exc_info=True)
        self.manual.clear()
