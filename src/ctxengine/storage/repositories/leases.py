"""SQL for concurrency leases."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, delete, func, insert, or_, select, tuple_, update

from ...ratelimit import CLOCK_SKEW
from ..backend import Backend, batch_document
from ..connection import Connection
from ..prebuilt import run
from ..schema import leases
from . import Repository

lc = leases.c
_OF_SESSION = and_(lc.tenant_id == bindparam("tenant"), lc.session_id == bindparam("sid"))
_BY_ID = and_(lc.tenant_id == bindparam("tenant"), lc.lease_id == bindparam("lease"))
# Statements built once (parameters: tenant, sid or lease, now, horizon, until).
_LIVE = select(func.count()).where(
    _OF_SESSION, lc.expires_at > bindparam("now"), lc.expires_at <= bindparam("horizon")
)
_DROP_DEAD = delete(leases).where(
    _OF_SESSION, or_(lc.expires_at <= bindparam("now"), lc.expires_at > bindparam("horizon"))
)
_INSERT = insert(leases).values({c.key: bindparam(c.key, type_=c.type) for c in leases.c})
_RENEW = (
    update(leases)
    .where(_BY_ID, lc.expires_at > bindparam("now"))
    .values(expires_at=bindparam("until", type_=lc.expires_at.type))
)
_RELEASE = delete(leases).where(_BY_ID)


class LeaseRepository(Repository):
    """Every statement on the lease table."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        batch = backend.batch_rows("batch", {"tenant": String(), "lease": String()})
        #: Release the leases of a batch (parameter: batch).
        self._release_batch = delete(leases).where(
            tuple_(lc.tenant_id, lc.lease_id).in_(select(batch.c.tenant, batch.c.lease))
        )

    # A lease is live while now < expires_at <= now + ttl (+ CLOCK_SKEW): one expiring
    # further ahead was stamped by a clock that has since stepped back, and is dead.
    async def live_leases(
        self, conn: Connection, tenant: str, session_id: str, now: datetime, ttl: float
    ) -> int:
        """How many leases of the session are live at ``now``."""
        params = {"tenant": tenant, "sid": session_id, "now": now, "horizon": _horizon(now, ttl)}
        return int((await run(conn, _LIVE, params)).scalar_one())

    async def insert_lease(self, conn: Connection, values: dict[str, Any]) -> None:
        await run(conn, _INSERT, values)

    async def drop_dead_leases(
        self, conn: Connection, tenant: str, session_id: str, now: datetime, ttl: float
    ) -> None:
        """Delete the session's leases that are not live at ``now``."""
        params = {"tenant": tenant, "sid": session_id, "now": now, "horizon": _horizon(now, ttl)}
        await run(conn, _DROP_DEAD, params)

    async def renew_lease(
        self, conn: Connection, tenant: str, lease_id: str, now: datetime, ttl: float
    ) -> bool:
        """Extend a lease not expired at ``now`` to ``now + ttl`` (one from before a step
        back of the clock too, if it is still there); False when it is gone."""
        until = now + timedelta(seconds=ttl)
        params = {"tenant": tenant, "lease": lease_id, "now": now, "until": until}
        return bool((await run(conn, _RENEW, params)).rowcount)

    async def release_leases(self, conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
        """Delete the leases (tenant, lease_id) ``keys``: one statement, whatever their
        number."""
        if len(keys) == 1:
            tenant, lease_id = keys[0]
            await run(conn, _RELEASE, {"tenant": tenant, "lease": lease_id})
            return
        rows = [{"tenant": tenant, "lease": lease_id} for tenant, lease_id in keys]
        await run(conn, self._release_batch, {"batch": batch_document(rows)})


def _horizon(now: datetime, ttl: float) -> datetime:
    """The latest ``expires_at`` of a live lease at ``now``."""
    return now + timedelta(seconds=ttl + CLOCK_SKEW)
