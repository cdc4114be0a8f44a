"""SQL for quotas, usage records, rate-limit rules and state, and concurrency leases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Row,
    Select,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    true,
    update,
)

from ...ratelimit import CLOCK_SKEW, in_us
from ..backend import Backend
from ..connection import Connection
from ..prebuilt import run
from ..schema import leases, quotas, rate_limit_rules, rate_limit_state, usage_records
from ..schema import sessions as s
from . import of_session, written_or_abort
from .sessions import TOUCH_WORKING, epoch

_Q_KEY = ("tenant_id", "session_id", "resource_type")
_INSERT_RECORD = insert(usage_records)
#: The quota row can take ``amount`` (parameters: amount).
_FITS = or_(
    quotas.c.quota_limit.is_(None), quotas.c.used + bindparam("amount") <= quotas.c.quota_limit
)
#: Add to an existing row only (parameters: tenant, sid, resource, amount).
_ADD_TO_EXISTING = (
    update(quotas)
    .where(
        quotas.c.tenant_id == bindparam("tenant"),
        quotas.c.session_id == bindparam("sid"),
        quotas.c.resource_type == bindparam("resource"),
        _FITS,
    )
    .values(used=quotas.c.used + bindparam("amount"))
    .returning(quotas.c.used, quotas.c.quota_limit)
)


def _track(backend: Backend, tier_limits: Mapping[str, float]) -> Any:
    """ONE statement for track_usage (data-modifying CTEs): touch the session if it can
    work and the quota has room, add the amount to the quota row (created with the
    limit ``tier_limits`` gives the session's tier, unlimited for other tiers), insert
    the usage record.

    As in ``ConversationRepository.append``: the session row is locked before the quota
    row, the room is checked in the snapshot and again on the locked row, and when it
    is gone in between, the statement aborts (``written_or_abort``). It returns
    (user_id, used, limit), or no row when nothing was written. Parameters: tenant,
    sid, now, now_epoch, resource, amount, record_id, operation, meta (named apart from the
    sessions table's columns, which an UPDATE would set from parameters of their names)."""
    q = quotas.c
    of_row = and_(
        q.tenant_id == bindparam("tenant"),
        q.session_id == bindparam("sid"),
        q.resource_type == bindparam("resource"),
    )
    row_exists = exists().where(of_row)
    tier_limit = (
        case(
            {tier: literal(limit, q.quota_limit.type) for tier, limit in tier_limits.items()},
            value=s.c.tier,
            else_=null(),
        )
        if tier_limits
        else null()
    )
    fits_new = or_(tier_limit.is_(None), bindparam("amount") <= tier_limit)
    touched = (
        TOUCH_WORKING.where(or_(exists().where(of_row, _FITS), and_(~row_exists, fits_new)))
        .returning(s.c.user_id, fits_new.label("fits_new"), tier_limit.label("tier_limit"))
        .cte("touched")
    )
    new_row = select(
        bindparam("tenant", type_=q.tenant_id.type).label("tenant_id"),
        bindparam("sid", type_=q.session_id.type).label("session_id"),
        bindparam("resource", type_=q.resource_type.type).label("resource_type"),
        bindparam("amount", type_=q.used.type).label("used"),
        touched.c.tier_limit.label("quota_limit"),
        false().label("custom"),
    ).where(or_(touched.c.fits_new, row_exists))
    counted = (
        backend.upsert(
            quotas,
            _Q_KEY,
            new_row,
            lambda excluded: {"used": q.used + excluded.used},
            lambda excluded: _FITS,
        )
        .returning(q.used, q.quota_limit)
        .cte("counted")
    )
    u = usage_records.c
    record = select(
        bindparam("tenant", type_=u.tenant_id.type),
        bindparam("record_id", type_=u.record_id.type),
        bindparam("sid", type_=u.session_id.type),
        touched.c.user_id,
        bindparam("operation", type_=u.operation.type),
        bindparam("resource", type_=u.resource_type.type),
        bindparam("amount", type_=u.amount.type),
        bindparam("meta", type_=u.metadata.type),
        bindparam("now", type_=u.created_at.type),
    ).select_from(touched.join(counted, true()))
    recorded = insert(usage_records).from_select([c.name for c in usage_records.c], record)
    returned = (touched.c.user_id, counted.c.used, counted.c.quota_limit)
    return written_or_abort(touched, counted, counted.c.used, *returned).add_cte(
        recorded.cte("recorded")
    )


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Filters of get_usage_history."""

    user_id: str | None = None
    session_id: str | None = None
    resource_type: str | None = None
    operation: str | None = None
    since: datetime | None = None


_r = rate_limit_rules.c


def _rule_of(session_id: Any, user_id: Any) -> Select[Any]:
    """The custom rule of a session, else of its user (parameter: operation; the
    caller adds the tenant): one lookup for both scopes."""
    return (
        select(_r.scope, _r.max_calls, _r.window_seconds)
        .where(
            _r.operation == bindparam("operation"),
            or_(
                and_(_r.scope == "session", _r.subject == session_id),
                and_(_r.scope == "user", _r.subject == user_id),
            ),
        )
        .order_by(_r.scope)  # "session" < "user": the session's rule first
        .limit(1)
    )


_RULE = _rule_of(bindparam("session_id"), bindparam("user_id")).where(
    _r.tenant_id == bindparam("tenant")
)
_STATE_KEY = ("tenant_id", "scope", "subject", "operation", "window_ms")
#: Parameters of a limiter state's key, by column (named apart from the columns).
_STATE_PARAMS: dict[str, Any] = {column: bindparam(f"k_{column}") for column in _STATE_KEY}
_STATE_WHERE = and_(*(rate_limit_state.c[column] == bind for column, bind in _STATE_PARAMS.items()))
_PEEK_STATE = select(rate_limit_state.c.state).where(_STATE_WHERE)
_SAVE_STATE = (
    update(rate_limit_state)
    .where(_STATE_WHERE)
    .values(state=bindparam("state"), updated_at=bindparam("now"))
)


def _take(backend: Backend, tier_max: Mapping[str, int], tier_window: float) -> Any:
    """ONE statement for an admission (data-modifying CTEs, PostgreSQL): find the limit
    that applies (the session's rule, else its user's, else ``tier_max`` of the
    session's tier, over ``tier_window`` seconds), touch the session if it can work and
    the limit admits the call, and write the limiter state the function
    ``ctx_rate_limit_take`` (migration 0005, the rule of ``ratelimit.decide``) gives.

    As in ``_track``: the call is admitted in the statement's snapshot before the
    session row is locked, and again on the locked state row; when it no longer is,
    the statement aborts (``written_or_abort``). It returns (state, max_calls,
    window_seconds), or no row when nothing was written: refused, no limit, the
    session cannot work, or the state is newer than ``now_us``. Parameters: tenant,
    sid, now, now_epoch, operation, now_us, cost."""
    r, st = rate_limit_rules.c, rate_limit_state.c
    rule = _rule_of(s.c.session_id, s.c.user_id).where(r.tenant_id == s.c.tenant_id).lateral("rule")
    by_tier = (
        case({tier: literal(n, r.max_calls.type) for tier, n in tier_max.items()}, value=s.c.tier)
        if tier_max
        else null()
    )
    window = func.coalesce(rule.c.window_seconds, literal(tier_window, r.window_seconds.type))
    limit = (
        select(
            func.coalesce(rule.c.scope, "session").label("scope"),
            case((rule.c.scope == "user", s.c.user_id), else_=s.c.session_id).label("subject"),
            func.coalesce(rule.c.max_calls, by_tier).label("max_calls"),
            window.label("window_seconds"),
            # as the Python keys: round() to the nearest, ties to even, on both sides
            cast(func.round(window * 1000), BigInteger).label("window_ms"),
            func.greatest(cast(func.round(window * 1_000_000), BigInteger), 1).label("window_us"),
        )
        .select_from(s.outerjoin(rule, true()))
        .where(s.c.tenant_id == bindparam("tenant"), s.c.session_id == bindparam("sid"))
        .cte("limit")
    )
    of_key = and_(
        st.tenant_id == bindparam("tenant"),
        st.scope == limit.c.scope,
        st.subject == limit.c.subject,
        st.operation == bindparam("operation"),
        st.window_ms == limit.c.window_ms,
    )

    def take(state: Any, window_us: Any, max_calls: Any) -> Any:
        """The new state, or NULL."""
        return func.ctx_rate_limit_take(
            state,
            bindparam("now_us", type_=BigInteger),
            window_us,
            max_calls,
            bindparam("cost", type_=BigInteger),
            type_=st.state.type,
        )

    stored = select(st.state).where(of_key).scalar_subquery()
    admitted = (
        select(limit)
        .where(
            limit.c.max_calls.is_not(None),
            take(stored, limit.c.window_us, limit.c.max_calls).is_not(None),
        )
        .cte("admitted")
    )
    touched = (
        TOUCH_WORKING.where(exists(select(admitted.c.scope)))
        .returning(s.c.session_id)
        .cte("touched")
    )
    new_row = select(
        bindparam("tenant", type_=st.tenant_id.type).label("tenant_id"),
        admitted.c.scope,
        admitted.c.subject,
        bindparam("operation", type_=st.operation.type).label("operation"),
        admitted.c.window_ms,
        take(null(), admitted.c.window_us, admitted.c.max_calls).label("state"),
        bindparam("now", type_=st.updated_at.type).label("updated_at"),
    ).select_from(admitted.join(touched, true()))
    # ON CONFLICT DO UPDATE sees only the locked row and EXCLUDED: the limit's columns
    # come in as scalar subqueries
    on_locked = (
        st.state,
        select(admitted.c.window_us).scalar_subquery(),
        select(admitted.c.max_calls).scalar_subquery(),
    )
    written = (
        backend.upsert(
            rate_limit_state,
            _STATE_KEY,
            new_row,
            lambda excluded: {"state": take(*on_locked), "updated_at": excluded.updated_at},
            lambda excluded: take(*on_locked).is_not(None),
        )
        .returning(st.state)
        .cte("written")
    )
    returned = (written.c.state, admitted.c.max_calls, admitted.c.window_seconds)
    return written_or_abort(touched, written, written.c.state, *returned)


def _state_params(key: tuple[str, str, str, str, int]) -> dict[str, Any]:
    return {f"k_{column}": value for column, value in zip(_STATE_KEY, key, strict=True)}


class UsageRepository:
    """Every statement on the usage and limit tables."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        q = quotas.c
        #: Add to the row, creating it with the tier's limit (parameters: tenant, sid,
        #: resource, amount, limit); built once, as building costs more than running it.
        self._add_or_create = backend.upsert(
            quotas,
            _Q_KEY,
            {
                "tenant_id": bindparam("tenant"),
                "session_id": bindparam("sid"),
                "resource_type": bindparam("resource"),
                "used": bindparam("amount"),
                "quota_limit": bindparam("limit"),
                "custom": False,
            },
            lambda excluded: {"used": q.used + excluded.used},
            lambda excluded: _FITS,
        ).returning(q.used, q.quota_limit)
        #: ``_track`` statements, by the tier limits they were built for.
        self._tracks: dict[tuple[tuple[str, float], ...], Any] = {}
        #: ``_take`` statements, by the tier limits and window they were built for.
        self._takes: dict[tuple[tuple[tuple[str, int], ...], float], Any] = {}
        #: The limiter state row, created empty, locked (parameters: the key, state, now).
        self._lock_state = backend.upsert(
            rate_limit_state,
            _STATE_KEY,
            {**_STATE_PARAMS, "state": bindparam("state"), "updated_at": bindparam("now")},
            # a no-op update: it takes the row lock and returns the stored state
            lambda excluded: {"updated_at": rate_limit_state.c.updated_at},
        ).returning(rate_limit_state.c.state)
        #: The state written, the row created if missing (parameters: the key, state, now).
        self._put_state = backend.upsert(
            rate_limit_state,
            _STATE_KEY,
            {**_STATE_PARAMS, "state": bindparam("state"), "updated_at": bindparam("now")},
            lambda excluded: {"state": excluded.state, "updated_at": excluded.updated_at},
        )

    # -- quotas -------------------------------------------------------------------------
    async def add_to_quota(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        resource_type: str,
        amount: float,
        tier_limit: float | None,
    ) -> tuple[float, float | None] | None:
        """Add ``amount`` if it fits under the row's limit (the tier's limit for a new
        row); the new (used, limit), or None when it does not fit."""
        params = {
            "tenant": tenant,
            "sid": session_id,
            "resource": resource_type,
            "amount": amount,
            "limit": tier_limit,
        }
        # a new row could take it only if it is within the tier's limit; else only an
        # existing (custom) limit might
        fits_new = tier_limit is None or amount <= tier_limit
        stmt = self._add_or_create if fits_new else _ADD_TO_EXISTING
        row = (await run(conn, stmt, params)).first()
        return None if row is None else (float(row[0]), _opt_float(row[1]))

    async def track(
        self,
        conn: Connection,
        record: dict[str, Any],
        tier_limits: tuple[tuple[str, float], ...],
    ) -> tuple[str, float, float | None] | None:
        """Touch the session, count ``record`` (usage record values without user_id)
        against its quota, insert it, in ONE statement (:attr:`Backend.data_modifying_ctes`),
        if the session can work and the quota has room (a new quota row gets the limit
        ``tier_limits``, (tier, limit) pairs, gives the session's tier). (user_id, used,
        limit), or None when nothing was written."""
        stmt = self._tracks.get(tier_limits)
        if stmt is None:
            stmt = self._tracks[tier_limits] = _track(self.backend, dict(tier_limits))
        params = {
            "tenant": record["tenant_id"],
            "sid": record["session_id"],
            "now": record["created_at"],
            "now_epoch": epoch(record["created_at"]),
            "resource": record["resource_type"],
            "amount": record["amount"],
            "record_id": record["record_id"],
            "operation": record["operation"],
            "meta": record["metadata"],
        }
        row = (await run(conn, stmt, params)).first()
        return None if row is None else (row[0], float(row[1]), _opt_float(row[2]))

    async def quota_rows(
        self, conn: Connection, tenant: str, session_id: str
    ) -> dict[str, tuple[float, float | None, bool]]:
        """resource_type → (used, limit, custom) for the rows that exist."""
        q = quotas.c
        rows = await conn.execute(
            select(q.resource_type, q.used, q.quota_limit, q.custom).where(
                of_session(quotas, tenant, session_id)
            )
        )
        return {r[0]: (float(r[1]), _opt_float(r[2]), bool(r[3])) for r in rows}

    async def set_quota(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        resource_type: str,
        limit: float | None,
    ) -> None:
        values = {
            "tenant_id": tenant,
            "session_id": session_id,
            "resource_type": resource_type,
            "used": 0.0,
            "quota_limit": limit,
            "custom": True,
        }
        await conn.execute(
            self.backend.upsert(
                quotas,
                _Q_KEY,
                values,
                lambda excluded: {"quota_limit": excluded.quota_limit, "custom": True},
            )
        )

    async def retier_quotas(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        limits: dict[str, float | None],
    ) -> None:
        """Give every non-custom quota row of the session its new tier limit."""
        q = quotas.c
        for resource_type, limit in limits.items():
            await conn.execute(
                update(quotas)
                .where(
                    q.tenant_id == tenant,
                    q.session_id == session_id,
                    q.resource_type == resource_type,
                    q.custom.is_(False),
                )
                .values(quota_limit=limit)
            )

    async def custom_limit(
        self, conn: Connection, tenant: str, session_id: str, resource_type: str
    ) -> tuple[bool, float | None]:
        """(True, limit) when set_quota() set this quota, else (False, None)."""
        q = quotas.c
        row = (
            await conn.execute(
                select(q.quota_limit).where(
                    q.tenant_id == tenant,
                    q.session_id == session_id,
                    q.resource_type == resource_type,
                    q.custom.is_(True),
                )
            )
        ).first()
        return (False, None) if row is None else (True, _opt_float(row[0]))

    async def restore_quotas(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        rows: Sequence[tuple[str, float, float | None, bool]],
    ) -> None:
        """Insert (resource_type, used, limit, custom) counter rows of a new session."""
        if rows:
            await conn.execute(
                insert(quotas),
                [
                    {
                        "tenant_id": tenant,
                        "session_id": session_id,
                        "resource_type": kind,
                        "used": used,
                        "quota_limit": limit,
                        "custom": custom,
                    }
                    for kind, used, limit, custom in rows
                ],
            )

    # -- usage records ------------------------------------------------------------------
    async def insert_record(self, conn: Connection, values: dict[str, Any]) -> None:
        await run(conn, _INSERT_RECORD, values)

    async def history(
        self, conn: Connection, tenant: str, f: UsageFilter, limit: int
    ) -> Sequence[Row[Any]]:
        u = usage_records.c
        stmt = select(usage_records).where(u.tenant_id == tenant)
        if f.user_id is not None:
            stmt = stmt.where(u.user_id == f.user_id)
        if f.session_id is not None:
            stmt = stmt.where(u.session_id == f.session_id)
        if f.resource_type is not None:
            stmt = stmt.where(u.resource_type == f.resource_type)
        if f.operation is not None:
            stmt = stmt.where(u.operation == f.operation)
        if f.since is not None:
            stmt = stmt.where(u.created_at >= f.since)
        stmt = stmt.order_by(u.created_at.desc(), u.record_id.desc()).limit(limit)
        return (await conn.execute(stmt)).all()

    async def amounts_since(
        self, conn: Connection, tenant: str, session_id: str, since: datetime
    ) -> dict[str, float]:
        u = usage_records.c
        rows = await conn.execute(
            select(u.resource_type, func.sum(u.amount))
            .where(of_session(usage_records, tenant, session_id), u.created_at > since)
            .group_by(u.resource_type)
        )
        return {r[0]: float(r[1]) for r in rows}

    async def user_breakdown(
        self, conn: Connection, tenant: str, user_id: str
    ) -> tuple[dict[str, int], dict[str, float]]:
        """(operation → count, resource type → amount) over the user's usage records."""
        u = usage_records.c
        mine = and_(u.tenant_id == tenant, u.user_id == user_id)
        ops = await conn.execute(
            select(u.operation, func.count()).where(mine).group_by(u.operation)
        )
        res = await conn.execute(
            select(u.resource_type, func.sum(u.amount)).where(mine).group_by(u.resource_type)
        )
        return {r[0]: int(r[1]) for r in ops}, {r[0]: float(r[1]) for r in res}

    # -- rate limits --------------------------------------------------------------------
    async def rule(
        self, conn: Connection, tenant: str, session_id: str, user_id: str, operation: str
    ) -> tuple[str, int, float] | None:
        """(scope, max_calls, window) of the session's custom rule, else its user's."""
        params = {
            "tenant": tenant,
            "session_id": session_id,
            "user_id": user_id,
            "operation": operation,
        }
        row = (await run(conn, _RULE, params)).first()
        return None if row is None else (row[0], int(row[1]), float(row[2]))

    async def take(
        self,
        conn: Connection,
        key: tuple[str, str, str],
        cost: int,
        now: datetime,
        tier_limits: tuple[tuple[str, int], ...],
        tier_window: float,
    ) -> tuple[Any, int, float] | None:
        """Admit a call of ``cost`` in ONE statement (:attr:`Backend.data_modifying_ctes`)
        under the limit that applies to ``key`` (tenant, session_id, operation), the
        session's tier giving ``tier_limits`` calls per ``tier_window`` seconds when it
        has no rule: (new state, max_calls, window), or None when nothing was written."""
        stmt = self._takes.get((tier_limits, tier_window))
        if stmt is None:
            stmt = _take(self.backend, dict(tier_limits), tier_window)
            self._takes[(tier_limits, tier_window)] = stmt
        tenant, session_id, operation = key
        params = {
            "tenant": tenant,
            "sid": session_id,
            "operation": operation,
            "now": now,
            "now_us": in_us(now.timestamp()),
            "now_epoch": epoch(now),
            "cost": cost,
        }
        row = (await run(conn, stmt, params)).first()
        return None if row is None else (row[0], int(row[1]), float(row[2]))

    async def set_rule(
        self,
        conn: Connection,
        tenant: str,
        scope: str,
        subject: str,
        operation: str,
        max_calls: int,
        window: float,
    ) -> None:
        values = {
            "tenant_id": tenant,
            "scope": scope,
            "subject": subject,
            "operation": operation,
            "max_calls": max_calls,
            "window_seconds": window,
        }
        await conn.execute(
            self.backend.upsert(
                rate_limit_rules,
                ("tenant_id", "scope", "subject", "operation"),
                values,
                lambda excluded: {
                    "max_calls": excluded.max_calls,
                    "window_seconds": excluded.window_seconds,
                },
            )
        )

    async def lock_state(
        self, conn: Connection, key: tuple[str, str, str, str, int], now: datetime
    ) -> Any:
        """The limiter state of ``key`` (None for no calls yet), locked until the transaction
        ends: on a backend whose write transactions exclude each other, a plain read."""
        if self.backend.exclusive_writes:
            return await self.peek_state(conn, key)
        params = {**_state_params(key), "state": {}, "now": now}
        return (await run(conn, self._lock_state, params)).scalar_one()

    async def peek_state(self, conn: Connection, key: tuple[str, str, str, str, int]) -> Any:
        return (await run(conn, _PEEK_STATE, _state_params(key))).scalar_one_or_none()

    async def save_state(
        self,
        conn: Connection,
        key: tuple[str, str, str, str, int],
        state: Any,
        now: datetime,
    ) -> None:
        """Write the state of ``key`` read by ``lock_state`` in this transaction."""
        stmt = self._put_state if self.backend.exclusive_writes else _SAVE_STATE
        await run(conn, stmt, {**_state_params(key), "state": state, "now": now})

    # -- leases -------------------------------------------------------------------------
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


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
