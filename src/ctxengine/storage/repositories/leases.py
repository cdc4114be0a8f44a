"""SQL for concurrency leases."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select, update

from ...ratelimit import CLOCK_SKEW
from ..backend import Backend
from ..connection import Connection
from ..schema import leases
from . import Repository, of_session


class LeaseRepository(Repository):
    """Every statement on the lease table."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)

    # A lease is live while now < expires_at <= now + ttl (+ CLOCK_SKEW): one expiring
    # further ahead was stamped by a clock that has since stepped back, and is dead.
    async def live_leases(
        self, conn: Connection, tenant: str, session_id: str, now: datetime, ttl: float
    ) -> int:
        """How many leases of the session are live at ``now``."""
        lc = leases.c
        stmt = select(func.count()).where(
            of_session(leases, tenant, session_id),
            lc.expires_at > now,
            lc.expires_at <= _horizon(now, ttl),
        )
        return int((await conn.execute(stmt)).scalar_one())

    async def insert_lease(self, conn: Connection, values: dict[str, Any]) -> None:
        await conn.execute(leases.insert().values(**values))

    async def drop_dead_leases(
        self, conn: Connection, tenant: str, session_id: str, now: datetime, ttl: float
    ) -> None:
        """Delete the session's leases that are not live at ``now``."""
        lc = leases.c
        await conn.execute(
            delete(leases).where(
                of_session(leases, tenant, session_id),
                or_(lc.expires_at <= now, lc.expires_at > _horizon(now, ttl)),
            )
        )

    async def renew_lease(
        self, conn: Connection, tenant: str, lease_id: str, now: datetime, ttl: float
    ) -> bool:
        """Extend a lease not expired at ``now`` to ``now + ttl`` (one from before a step
        back of the clock too, if it is still there); False when it is gone."""
        lc = leases.c
        result = await conn.execute(
            update(leases)
            .where(lc.tenant_id == tenant, lc.lease_id == lease_id, lc.expires_at > now)
            .values(expires_at=now + timedelta(seconds=ttl))
        )
        return bool(result.rowcount)

    async def release_lease(self, conn: Connection, tenant: str, lease_id: str) -> None:
        lc = leases.c
        await conn.execute(delete(leases).where(lc.tenant_id == tenant, lc.lease_id == lease_id))


def _horizon(now: datetime, ttl: float) -> datetime:
    """The latest ``expires_at`` of a live lease at ``now``."""
    return now + timedelta(seconds=ttl + CLOCK_SKEW)
