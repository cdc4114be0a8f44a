"""SQL for rate-limit rules and limiter state."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    Numeric,
    Select,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    true,
    update,
)

from ...lifecycle import epoch
from ...ratelimit import in_us
from ..backend import Backend
from ..connection import Connection
from ..prebuilt import run
from ..schema import rate_limit_rules, rate_limit_state
from ..schema import sessions as s
from . import Repository, written_or_abort
from .sessions import TOUCH_WORKING

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


def _divide_by_zero(column: Any) -> Any:
    """An integer expression that divides by zero when evaluated (SQLSTATE 22012, which
    ctxengine raises only to abort a one-statement write, retried as transient); it
    reads ``column`` so that the planner cannot evaluate it in advance."""
    return literal(1) // (column - column)


def _take(backend: Backend, tier_max: Mapping[str, int], tier_window: float) -> Any:
    """ONE statement for an admission (data-modifying CTEs, PostgreSQL): find the limit
    that applies (the session's rule, else its user's, else ``tier_max`` of the
    session's tier, over ``tier_window`` seconds), touch the session if it can work and
    the limit admits the call, and write the limiter state the function
    ``ctx_rate_limit_take`` (migration 0005, the rule of ``ratelimit.decide``) gives.

    As in ``quotas._track``: the call is admitted in the statement's snapshot before the
    session row is locked, and again on the locked state row; when it no longer is,
    the statement aborts (there by dividing by zero in the SET, as ``written_or_abort``
    does), and is retried. It returns (state, max_calls,
    window_seconds), both NULL when no limit applies (the session is only touched),
    or no row when nothing was written: refused, the session cannot work, or the
    state is newer than ``now_us``. Parameters: tenant, sid, now, now_epoch,
    operation, now_us, cost."""
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

    def fresh_state(window_us: Any) -> Any:
        """What ``take`` gives for no state, the call admitted: the current sub-window
        holding ``cost`` calls (``{"b": now_us * 60 div window_us, "c": [cost]}``),
        written out rather than evaluated by the PL/pgSQL function (a third of the
        statement's time went to its evaluations)."""
        now_us = cast(bindparam("now_us", type_=BigInteger), Numeric)
        return func.jsonb_build_object(
            "b",
            func.div(now_us * 60, window_us),
            "c",
            func.jsonb_build_array(bindparam("cost", type_=BigInteger)),
            type_=st.state.type,
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
            or_(
                limit.c.max_calls.is_(None),  # no limit applies: only the touch
                take(stored, limit.c.window_us, limit.c.max_calls).is_not(None),
            )
        )
        .cte("admitted")
    )
    touched = (
        TOUCH_WORKING.where(exists(select(admitted.c.scope)))
        .returning(s.c.session_id)
        .cte("touched")
    )
    new_row = (
        select(
            bindparam("tenant", type_=st.tenant_id.type).label("tenant_id"),
            admitted.c.scope,
            admitted.c.subject,
            bindparam("operation", type_=st.operation.type).label("operation"),
            admitted.c.window_ms,
            fresh_state(admitted.c.window_us).label("state"),
            bindparam("now", type_=st.updated_at.type).label("updated_at"),
        )
        .select_from(admitted.join(touched, true()))
        .where(admitted.c.max_calls.is_not(None))
    )
    # ON CONFLICT DO UPDATE sees only the locked row and EXCLUDED: the limit's columns
    # come in as scalar subqueries
    on_locked = (
        st.state,
        select(admitted.c.window_us).scalar_subquery(),
        select(admitted.c.max_calls).scalar_subquery(),
    )
    # refused on the locked row (a concurrent admission took the room after this
    # statement's snapshot admitted the call): abort, as written_or_abort does, with
    # the rule evaluated once rather than in a WHERE and again in the SET
    state_or_abort = func.coalesce(take(*on_locked), func.to_jsonb(_divide_by_zero(st.window_ms)))
    written = (
        backend.upsert(
            rate_limit_state,
            _STATE_KEY,
            new_row,
            lambda excluded: {"state": state_or_abort, "updated_at": excluded.updated_at},
        )
        .returning(st.state)
        .cte("written")
    )
    returned = (written.c.state, admitted.c.max_calls, admitted.c.window_seconds)
    limited = admitted.c.max_calls.is_not(None)
    return written_or_abort(touched, written, written.c.state, *returned, due=limited)


class Rule(NamedTuple):
    """A custom rate-limit rule: whose (``"session"`` or ``"user"``), and ``max_calls``
    per ``window_seconds``."""

    scope: str
    max_calls: int
    window_seconds: float


class Admitted(NamedTuple):
    """A call ``take`` admitted: the limiter state it wrote, under ``max_calls`` per
    ``window_seconds`` (None, None and None: no limit applied)."""

    state: Any
    max_calls: int | None
    window_seconds: float | None


def _state_params(key: tuple[str, str, str, str, int]) -> dict[str, Any]:
    return {f"k_{column}": value for column, value in zip(_STATE_KEY, key, strict=True)}


class RateLimitRepository(Repository):
    """Every statement on the rate-limit rule and limiter state tables."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
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

    async def rule(
        self, conn: Connection, tenant: str, session_id: str, user_id: str, operation: str
    ) -> Rule | None:
        """The session's custom rule for ``operation``, else its user's, else None."""
        params = {
            "tenant": tenant,
            "session_id": session_id,
            "user_id": user_id,
            "operation": operation,
        }
        row = (await run(conn, _RULE, params)).first()
        return None if row is None else Rule(row[0], int(row[1]), float(row[2]))

    async def take(
        self,
        conn: Connection,
        key: tuple[str, str, str],
        cost: int,
        now: datetime,
        tier_limits: tuple[tuple[str, int], ...],
        tier_window: float,
    ) -> Admitted | None:
        """Admit a call of ``cost`` in ONE statement (:attr:`Backend.data_modifying_ctes`)
        under the limit that applies to ``key`` (tenant, session_id, operation), the
        session's tier giving ``tier_limits`` calls per ``tier_window`` seconds when it
        has no rule; None when nothing was written."""
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
        if row is None:
            return None
        if row[1] is None:
            return Admitted(None, None, None)
        return Admitted(row[0], int(row[1]), float(row[2]))

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
