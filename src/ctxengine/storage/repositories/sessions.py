"""SQL for the sessions table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, cast

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Double,
    String,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.types import TypeEngine

from ...lifecycle import LIFE, OPEN_STATUSES, WORKING_STATUSES, epoch
from ...models import Session, SessionStatus
from ...ratelimit import CLOCK_SKEW
from ..backend import Backend, batch_document
from ..connection import Connection
from ..prebuilt import Record, run
from ..schema import (
    chats,
    idle_bucket,
    leases,
    memories,
    memory_items,
    quotas,
    rate_limit_rules,
    rate_limit_state,
)
from ..schema import sessions as t
from ..types import JSONDocument, UTCDateTime
from . import Repository, after_locking, locked_in_key_order, of_session

_OPEN = [s.value for s in OPEN_STATUSES]


class SessionKey(NamedTuple):
    """Whose a session is, and its status (after the statement that returned it)."""

    tenant_id: str
    session_id: str
    user_id: str
    status: str


class Worker(NamedTuple):
    """What most calls need of the session they work on: whose it is."""

    session_id: str
    user_id: str
    tier: str
    current_chat_id: str | None


class Totals(NamedTuple):
    """Aggregates over a tenant's sessions."""

    by_status: dict[str, int]
    sessions: int
    users: int
    requests: int
    errors: int
    processing_time: float


@dataclass
class Expired:
    """Sessions one sweep batch expired: how many per tenant, and their keys when asked
    for."""

    by_tenant: Counter[str]
    rows: list[SessionKey]

    @property
    def count(self) -> int:
        return sum(self.by_tenant.values())


#: The columns of a Session (the idle deadline and its bucket are for the sweep).
_COLUMNS = [c for c in t.c if c.name not in ("idle_deadline", "idle_bucket")]
#: The columns of a SessionKey.
_KEY = [t.c[name] for name in SessionKey._fields]


def _live_leases(tenant: Any, session_id: Any, now: Any, horizon: Any) -> Any:
    """The number of live leases of one session at ``now``, as a labelled column: those
    expiring after ``now`` and not after ``horizon`` (see :meth:`SessionRepository.horizon`)."""
    return (
        select(func.count())
        .where(
            leases.c.tenant_id == tenant,
            leases.c.session_id == session_id,
            leases.c.expires_at > now,
            leases.c.expires_at <= horizon,
        )
        .scalar_subquery()
        .label("concurrent_operations")
    )


def _returned(tenant: Any, session_id: Any, now: Any, horizon: Any) -> list[Any]:
    """``_COUNTED`` for the RETURNING clause of a write to the one session of the key:
    SQLite renders RETURNING columns unqualified, so a subquery correlated to the
    written row would compare the lease table's columns with themselves."""
    return [*_COLUMNS, _live_leases(tenant, session_id, now, horizon)]


# "A session can work", in SQL: the translation, bound by bound, of the rule that
# ctxengine.lifecycle states (WORKING_STATUSES, LIFE), from the same pieces.


def live(now: Any, now_epoch: Any) -> ColumnElement[bool]:
    """:func:`ctxengine.lifecycle.is_live` at ``now`` (a datetime, and as seconds since
    the epoch): within every bound of ``LIFE`` — its column NULL, or the bound holds."""
    instants = {"now": now, "now_epoch": now_epoch}
    return and_(
        *(
            or_(
                t.c[bound.column].is_(None),
                bound.within(t.c[bound.column], instants[bound.instant]),
            )
            for bound in LIFE
        )
    )


def stale(now: Any, now_epoch: Any) -> ColumnElement[bool]:
    """Outside some bound of ``LIFE`` (the negation of ``live``: a NULL column is within
    its bound, and its negated comparison is not true)."""
    instants = {"now": now, "now_epoch": now_epoch}
    return or_(*(not_(bound.within(t.c[bound.column], instants[bound.instant])) for bound in LIFE))


def can_work(now: Any, now_epoch: Any) -> ColumnElement[bool]:
    """:func:`ctxengine.lifecycle.can_work`: a working status, and live."""
    working = or_(*(t.c.status == status.value for status in sorted(WORKING_STATUSES)))
    return and_(working, live(now, now_epoch))


#: What every write that records activity sets (parameters now, now_epoch).
TOUCHED: dict[str, Any] = {
    "last_activity": bindparam("now"),
    "idle_deadline": bindparam("now_epoch", type_=Double()) + t.c.idle_timeout,
}

# Statements of the hot paths, built once: building a statement costs more than
# executing it on SQLite. Parameters: tenant, sid, now, now_epoch (``epoch(now)``),
# requests, errors, processing_time.
_BY_KEY = and_(t.c.tenant_id == bindparam("tenant"), t.c.session_id == bindparam("sid"))
#: A session that can work (parameters now, now_epoch).
CAN_WORK = can_work(bindparam("now"), bindparam("now_epoch", type_=Double()))
#: Every session column plus the number of live leases at ``now`` (for SELECTs).
_COUNTED = [
    *_COLUMNS,
    _live_leases(t.c.tenant_id, t.c.session_id, bindparam("now"), bindparam("horizon")),
]
_GET = select(*_COLUMNS).where(_BY_KEY)
_GET_COUNTED = select(*_COUNTED).where(_BY_KEY)
_RECORD = (
    update(t)
    .where(_BY_KEY)
    .values(
        **TOUCHED,
        request_count=t.c.request_count + bindparam("requests"),
        error_count=t.c.error_count + bindparam("errors"),
        total_processing_time=t.c.total_processing_time + bindparam("processing_time"),
    )
    .returning(
        *_returned(bindparam("tenant"), bindparam("sid"), bindparam("now"), bindparam("horizon"))
    )
)
_RECORD_ACTIVE = _RECORD.where(CAN_WORK)
#: Touch a session that can work (parameters: tenant, sid, now, now_epoch); the writes
#: of the hot paths add their own conditions and RETURNING.
#: Never run it as it is: compiling a statement remembers the columns it returns (none
#: here), and SQLAlchemy 2.1 hands that on to a statement derived from it afterwards,
#: whose ``RETURNING`` then yields no columns. Run a statement derived from it.
TOUCH_WORKING = update(t).where(_BY_KEY, CAN_WORK).values(**TOUCHED)
_TOUCH_ACTIVE = TOUCH_WORKING.returning(*(t.c[name] for name in Worker._fields))


def _insert_with_chat(backend: Backend, columns: Sequence[str], chat_columns: Sequence[str]) -> Any:
    """``WITH s AS (INSERT session … RETURNING *), c AS (INSERT chat SELECT … FROM s)
    SELECT * FROM s``; parameters ``s_<column>`` and ``c_<column>``."""
    new_session = (
        backend.insert_or_ignore(t, ("tenant_id", "session_id"))
        .values({c: bindparam(f"s_{c}", type_=t.c[c].type) for c in columns})
        .returning(*_COLUMNS)
        .cte("new_session")
    )
    chat_row = select(*(bindparam(f"c_{c}", type_=chats.c[c].type) for c in chat_columns))
    new_chat = insert(chats).from_select(list(chat_columns), chat_row.select_from(new_session))
    return select(new_session).add_cte(new_chat.cte("new_chat"))


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """Filters of list/iter/count_sessions."""

    user_id: str | None = None
    status: SessionStatus | None = None
    tier: str | None = None
    tags: tuple[str, ...] = ()
    created_after: datetime | None = None
    created_before: datetime | None = None
    idle_for: float | None = None


@dataclass(frozen=True, slots=True)
class Counters:
    """Increments applied by one update."""

    requests: int = 0
    errors: int = 0
    processing_time: float = 0.0


#: The columns of a batch of ``record_many`` (one row per session).
_BATCH_COLUMNS: dict[str, TypeEngine[Any]] = {
    "tenant": String(),
    "sid": String(),
    "requests": BigInteger(),
    "errors": BigInteger(),
    "processing_time": Double(),
}

_STATUSES = {status.value: status for status in SessionStatus}
#: Session fields read from the row, each with its position among ``_COLUMNS``.
_ROW_FIELDS = tuple(
    (name, [column.name for column in _COLUMNS].index(name))
    for name in Session.model_fields
    if name not in ("concurrent_operations", "observed_at")
)
_LIVE_LEASES = len(_COLUMNS)  # position of concurrent_operations, when selected


def _filter_shape(f: SessionFilter) -> tuple[bool, ...]:
    """Which filters ``f`` gives (a listing statement is built once per combination)."""
    return (
        f.user_id is not None,
        f.status is not None,
        f.tier is not None,
        bool(f.tags),
        f.created_after is not None,
        f.created_before is not None,
        f.idle_for is not None,
    )


def _listing_params(
    tenant: str, f: SessionFilter, now: datetime, horizon: datetime
) -> dict[str, Any]:
    """The values of the filters of ``f`` (those not given are not used)."""
    return {
        "tenant": tenant,
        "now": now,
        "horizon": horizon,
        "user_id": f.user_id,
        "status": None if f.status is None else f.status.value,
        "tier": f.tier,
        "tags": list(f.tags),
        "created_after": f.created_after,
        "created_before": f.created_before,
        "idle_cutoff": None if f.idle_for is None else now - timedelta(seconds=f.idle_for),
    }


#: Where a cursor's session sits in the listing order. Parameters: tenant, sid.
_POSITION = select(t.c.created_at, t.c.session_id).where(_BY_KEY)


def _session(row: Record, observed_at: datetime) -> Session:
    """Build the public snapshot from a row whose first columns are ``_COLUMNS`` (values
    are already validated on write); by position, which costs less than by name."""
    values = {name: row[position] for name, position in _ROW_FIELDS}
    values["status"] = _STATUSES[values["status"]]
    values["concurrent_operations"] = row[_LIVE_LEASES] if len(row) > _LIVE_LEASES else 0
    values["observed_at"] = observed_at
    return Session._trusted(values)


class SessionRepository(Repository):
    """Every statement on ``ctx_sessions``; the backend supplies dialect-specific pieces."""

    def __init__(self, backend: Backend, lease_ttl: float) -> None:
        super().__init__(backend)
        self._lease_reach = timedelta(seconds=lease_ttl + CLOCK_SKEW)
        #: The columns inserted are those of the parameters (compiled once per set).
        #: ``insert`` statements, by the columns of the row.
        self._inserts: dict[tuple[str, ...], Any] = {}
        #: ``insert_with_chat`` statements, by the columns of the two rows.
        self._inserts_with_chat: dict[tuple[tuple[str, ...], tuple[str, ...]], Any] = {}
        #: list_sessions pages, by the filters given, the cursor and the limit.
        self._listings: dict[tuple[bool, ...], Any] = {}
        #: ``record_many``'s statements, by whether the sessions must be able to work.
        #: By whether the sessions must be able to work and whether the batch has
        #: several sessions (only those are locked in key order first: a batch of one
        #: session's calls holds one lock, which no cycle can go through).
        self._record_batches = {
            (require, several): self._batch_statements(backend, require, several)
            for require in (True, False)
            for several in (True, False)
        }

    @staticmethod
    def _batch_statements(backend: Backend, require_active: bool, several: bool) -> tuple[Any, Any]:
        """``record_many``'s statements: one UPDATE of every session of a batch (that
        can work, with ``require_active``; parameters batch, now, now_epoch, horizon)
        returning its row and, where the database has data-modifying CTEs, its live
        leases (one round trip), the ``several`` sessions locked in key order first;
        elsewhere the count of their live leases is a second statement (batch, now,
        horizon): SQLite renders RETURNING columns unqualified, so a lease count
        correlated to each written row cannot be returned with it."""
        rows = backend.batch_rows("batch", _BATCH_COLUMNS)
        of_row = and_(t.c.tenant_id == rows.c.tenant, t.c.session_id == rows.c.sid)
        record = (
            update(t)
            .where(and_(of_row, CAN_WORK) if require_active else of_row)
            .values(
                **TOUCHED,
                request_count=t.c.request_count + rows.c.requests,
                error_count=t.c.error_count + rows.c.errors,
                total_processing_time=t.c.total_processing_time + rows.c.processing_time,
            )
            .returning(*_COLUMNS)
        )
        if backend.data_modifying_ctes:
            if several:  # locked in key order first, as by every batch
                keys = backend.batch_rows("batch", _BATCH_COLUMNS)
                locked = locked_in_key_order(
                    t, keys, (t.c.tenant_id == keys.c.tenant, t.c.session_id == keys.c.sid)
                )
                record = record.where(after_locking(locked))
            written = record.cte("written")
            leased = _live_leases(
                written.c.tenant_id, written.c.session_id, bindparam("now"), bindparam("horizon")
            )
            return select(*written.c, leased), None
        keys = backend.batch_rows("batch", _BATCH_COLUMNS)
        live = (
            select(leases.c.tenant_id, leases.c.session_id, func.count())
            .join(
                keys,
                and_(leases.c.tenant_id == keys.c.tenant, leases.c.session_id == keys.c.sid),
            )
            .where(
                leases.c.expires_at > bindparam("now"),
                leases.c.expires_at <= bindparam("horizon"),
            )
            .group_by(leases.c.tenant_id, leases.c.session_id)
        )
        return record, live

    def horizon(self, now: datetime) -> datetime:
        """The latest ``expires_at`` of a live lease at ``now``: one expiring further
        ahead (than ``lease_ttl``, give or take ``CLOCK_SKEW``) was stamped by a clock
        that has since stepped back, and counts as dead."""
        return now + self._lease_reach

    # -- reads --------------------------------------------------------------------------
    async def get(
        self, conn: Connection, tenant: str, session_id: str, now: datetime, *, leases: bool = True
    ) -> Session | None:
        """The session observed at ``now``, its live leases counted unless ``leases`` is
        False (``concurrent_operations`` is then 0)."""
        if leases:
            params = {"tenant": tenant, "sid": session_id, "now": now, "horizon": self.horizon(now)}
            row = (await run(conn, _GET_COUNTED, params)).first()
        else:
            row = (await run(conn, _GET, {"tenant": tenant, "sid": session_id})).first()
        return None if row is None else _session(row, now)

    async def count_open(
        self, conn: Connection, tenant: str, now: datetime, user_id: str | None = None
    ) -> int:
        """Active or paused sessions that are not due to expire."""
        now_epoch: Any = literal(epoch(now), Double())
        stmt = (
            select(func.count())
            .select_from(t)
            .where(
                t.c.tenant_id == tenant,
                t.c.status.in_(_OPEN),
                # ranges of the sweep's index: never idle, or not idle before now's bucket
                or_(t.c.idle_bucket.is_(None), t.c.idle_bucket >= idle_bucket(now_epoch)),
                live(literal(now, UTCDateTime), now_epoch),
            )
        )
        if user_id is not None:
            stmt = stmt.where(t.c.user_id == user_id)
        return int((await conn.execute(stmt)).scalar_one())

    def _listing(self, f: SessionFilter, *, after: bool, limited: bool) -> Any:
        """The page statement for the filters ``f`` gives (their values are parameters,
        see :func:`_listing_params`): built once per combination of filters."""
        shape = (*_filter_shape(f), after, limited)
        stmt = self._listings.get(shape)
        if stmt is None:
            stmt = self._filtered(select(*_COUNTED), f)
            if after:
                position = (
                    bindparam("after_created", type_=t.c.created_at.type),
                    bindparam("after_sid", type_=t.c.session_id.type),
                )
                stmt = stmt.where(tuple_(t.c.created_at, t.c.session_id) < tuple_(*position))
            stmt = stmt.order_by(t.c.created_at.desc(), t.c.session_id.desc())
            if limited:
                stmt = stmt.limit(bindparam("limit"))
            self._listings[shape] = stmt
        return stmt

    def _filtered(self, stmt: Any, f: SessionFilter) -> Any:
        """``stmt`` restricted to the filters ``f`` gives, their values as parameters."""
        stmt = stmt.where(t.c.tenant_id == bindparam("tenant"))
        if f.user_id is not None:
            stmt = stmt.where(t.c.user_id == bindparam("user_id"))
        if f.status is not None:
            stmt = stmt.where(t.c.status == bindparam("status"))
        if f.tier is not None:
            stmt = stmt.where(t.c.tier == bindparam("tier"))
        if f.tags:
            wanted = bindparam("tags", type_=JSONDocument)
            stmt = stmt.where(self.backend.json_contains_all(t.c.tags, wanted))
        if f.created_after is not None:
            stmt = stmt.where(t.c.created_at > bindparam("created_after"))
        if f.created_before is not None:
            stmt = stmt.where(t.c.created_at < bindparam("created_before"))
        if f.idle_for is not None:
            stmt = stmt.where(t.c.last_activity <= bindparam("idle_cutoff"))
        return stmt

    async def page(
        self,
        conn: Connection,
        tenant: str,
        f: SessionFilter,
        now: datetime,
        limit: int | None,
        after: tuple[datetime, str] | None,
    ) -> list[Session]:
        """Newest first, after ``after``: the (created_at, session_id) ending the last page;
        observed at ``now``."""
        stmt = self._listing(f, after=after is not None, limited=limit is not None)
        params = _listing_params(tenant, f, now, self.horizon(now))
        params["limit"] = limit
        if after is not None:
            params["after_created"], params["after_sid"] = after
        return [_session(row, now) for row in await run(conn, stmt, params)]

    async def position(
        self, conn: Connection, tenant: str, session_id: str
    ) -> tuple[datetime, str] | None:
        row = (await run(conn, _POSITION, {"tenant": tenant, "sid": session_id})).first()
        return None if row is None else (row[0], row[1])

    async def count(self, conn: Connection, tenant: str, f: SessionFilter, now: datetime) -> int:
        stmt = self._filtered(select(func.count()).select_from(t), f)
        params = _listing_params(tenant, f, now, self.horizon(now))
        return int((await conn.execute(stmt, params)).scalar_one())

    async def statistics(self, conn: Connection, tenant: str) -> Totals:
        by_status = (
            await conn.execute(
                select(t.c.status, func.count()).where(t.c.tenant_id == tenant).group_by(t.c.status)
            )
        ).all()
        totals = (
            await conn.execute(
                select(
                    func.count(),
                    func.count(func.distinct(t.c.user_id)),
                    func.coalesce(func.sum(t.c.request_count), 0),
                    func.coalesce(func.sum(t.c.error_count), 0),
                    func.coalesce(func.sum(t.c.total_processing_time), 0.0),
                ).where(t.c.tenant_id == tenant)
            )
        ).one()
        return Totals(
            by_status={status: int(n) for status, n in by_status},
            sessions=int(totals[0]),
            users=int(totals[1]),
            requests=int(totals[2]),
            errors=int(totals[3]),
            processing_time=float(totals[4]),
        )

    # -- writes -------------------------------------------------------------------------
    async def insert(
        self, conn: Connection, values: dict[str, Any], now: datetime
    ) -> Session | None:
        """Insert unless the id exists; the new session observed at ``now``, or None on
        conflict."""
        shape = tuple(values)
        stmt = self._inserts.get(shape)
        if stmt is None:
            stmt = self._inserts[shape] = (
                self.backend.insert_or_ignore(t, ("tenant_id", "session_id"))
                .values({c: bindparam(c, type_=t.c[c].type) for c in shape})
                .returning(*_COLUMNS)
            )
        row = (await run(conn, stmt, values)).first()
        return None if row is None else _session(row, now)

    async def record(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        now: datetime,
        require_active: bool,
        counters: Counters,
        metadata: dict[str, Any] | None,
    ) -> Session | None:
        """Add counters, merge metadata and touch, atomically; the session after it.

        With ``require_active`` the session must be able to work (``CAN_WORK``); else
        any status is accepted (metrics of work admitted earlier). None when no row
        matched.
        """
        params = {
            "tenant": tenant,
            "sid": session_id,
            "now": now,
            "now_epoch": epoch(now),
            "horizon": self.horizon(now),
            "requests": counters.requests,
            "errors": counters.errors,
            "processing_time": counters.processing_time,
        }
        stmt = _RECORD_ACTIVE if require_active else _RECORD
        row: Record | None
        if metadata:  # a statement of its own
            stmt = stmt.values(metadata=self.backend.json_merge(t.c.metadata, metadata))
            row = (await conn.execute(stmt, params)).first()
        else:
            row = (await run(conn, stmt, params)).first()
        return None if row is None else _session(row, now)

    async def record_many(
        self,
        conn: Connection,
        updates: Sequence[tuple[str, str, Counters]],
        now: datetime,
        require_active: bool,
    ) -> list[Session | None]:
        """:meth:`record` of several calls without metadata, as if they ran one after
        another in order: what each would have returned, or None where its session
        matched nothing (nothing was written for it). Calls on one session add up in
        one row write (integer counters exactly; processing times as their sum, to
        float rounding); sessions are written in key order, so batches of several
        processes lock them in one order."""
        if len(updates) == 1:
            tenant, session_id, counters = updates[0]
            return [
                await self.record(conn, tenant, session_id, now, require_active, counters, None)
            ]
        totals: dict[tuple[str, str], list[Any]] = {}
        for tenant, session_id, counters in updates:
            total = totals.setdefault((tenant, session_id), [0, 0, 0.0])
            total[0] += counters.requests
            total[1] += counters.errors
            total[2] += counters.processing_time
        names = tuple(_BATCH_COLUMNS)
        rows = [
            dict(zip(names, (*key, *total), strict=True)) for key, total in sorted(totals.items())
        ]
        batch = batch_document(rows)
        horizon = self.horizon(now)
        params = {"batch": batch, "now": now, "now_epoch": epoch(now), "horizon": horizon}
        record, count_leases = self._record_batches[require_active, len(rows) > 1]
        written = {(row[0], row[1]): row for row in await run(conn, record, params)}
        if not written:
            return [None] * len(updates)
        if count_leases is None:  # counted by the statement
            live = None
        else:
            lease_params = {"batch": batch, "now": now, "horizon": horizon}
            found = await run(conn, count_leases, lease_params)
            live = {(r[0], r[1]): r[2] for r in found}
        # each call sees the counters after its own update: the row's, less the calls
        # after it on the same session
        later: dict[tuple[str, str], list[Any]] = {key: [0, 0, 0.0] for key in written}
        results: list[Session | None] = []
        for tenant, session_id, counters in reversed(updates):
            key = (tenant, session_id)
            row = written.get(key)
            if row is None:
                results.append(None)
                continue
            after = later[key]
            session = _session(row if live is None else cast(Record, (*row, live.get(key, 0))), now)
            if after != [0, 0, 0.0]:
                session = session.model_copy(
                    update={
                        "request_count": session.request_count - after[0],
                        "error_count": session.error_count - after[1],
                        "total_processing_time": session.total_processing_time - after[2],
                    }
                )
            results.append(session)
            after[0] += counters.requests
            after[1] += counters.errors
            after[2] += counters.processing_time
        results.reverse()
        return results

    async def touch_active(
        self, conn: Connection, tenant: str, session_id: str, now: datetime
    ) -> Worker | None:
        """Touch the session if it can work (``CAN_WORK``); whose it is, or None when no
        row matched."""
        params = {"tenant": tenant, "sid": session_id, "now": now, "now_epoch": epoch(now)}
        row = (await run(conn, _TOUCH_ACTIVE, params)).first()
        return None if row is None else Worker._make(row)

    async def transition(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        now: datetime,
        sources: Sequence[SessionStatus],
        target: SessionStatus,
    ) -> Session | None:
        """Move a live session whose status is in ``sources`` to ``target``; the session
        after the move, observed at ``now``."""
        values: dict[str, Any] = {"status": target.value}
        if target in OPEN_STATUSES:
            values["last_activity"] = now
            values["idle_deadline"] = literal(epoch(now), Double()) + t.c.idle_timeout
        else:
            values["ended_at"] = now
        stmt = (
            update(t)
            .where(
                of_session(t, tenant, session_id),
                t.c.status.in_([s.value for s in sources]),
                live(now, epoch(now)),
            )
            .values(**values)
            .returning(*_returned(tenant, session_id, now, self.horizon(now)))
        )
        row = (await conn.execute(stmt)).first()
        return None if row is None else _session(row, now)

    async def expire_one(
        self, conn: Connection, tenant: str, session_id: str, now: datetime
    ) -> SessionKey | None:
        """Expire this session if it is open and stale; its key, or None."""
        stmt = (
            update(t)
            .where(
                of_session(t, tenant, session_id),
                t.c.status.in_(_OPEN),
                stale(now, epoch(now)),
            )
            .values(status=SessionStatus.EXPIRED.value, ended_at=now)
            .returning(*_KEY)
        )
        row = (await conn.execute(stmt)).first()
        return None if row is None else SessionKey._make(row)

    async def expire_stale(
        self,
        conn: Connection,
        tenant: str | None,
        now: datetime,
        max_idle_seconds: float | None,
        batch: int,
        *,
        keys: bool,
    ) -> Expired:
        """Expire up to ``batch`` open sessions idle longer than their own timeout (or
        than ``max_idle_seconds``, for every session, when given) or past their
        deadline; the keys of those expired only when ``keys`` (on PostgreSQL the
        database counts them otherwise, rather than sending back a row for each). Rows
        locked by other transactions are skipped (PostgreSQL), so concurrent sweepers
        never expire the same session twice."""
        expired = Expired(Counter(), [])
        # One status and one reason at a time, oldest first: each search is a range of
        # an index ((status, idle_bucket) or (status, expires_at)), whatever the
        # planner's row estimates, so a sweep with nothing to expire costs four probes
        # (and reads the sessions of the current bucket that are not idle yet).
        idle: ColumnElement[bool]
        if max_idle_seconds is None:
            now_epoch: Any = literal(epoch(now), Double())
            idle = and_(t.c.idle_bucket <= idle_bucket(now_epoch), t.c.idle_deadline < now_epoch)
            idle_order: Any = t.c.idle_bucket
        else:  # an operator's explicit limit, for every session: not what the index serves
            cutoff = literal(now - timedelta(seconds=max_idle_seconds), UTCDateTime)
            idle, idle_order = t.c.last_activity < cutoff, t.c.last_activity
        for status in _OPEN:
            for column, due in ((idle_order, idle), (t.c.expires_at, t.c.expires_at <= now)):
                room = batch - expired.count
                if room == 0:
                    return expired
                where = [t.c.status == status, due]
                if tenant is not None:
                    where.append(t.c.tenant_id == tenant)
                stmt = (
                    update(t)
                    .where(self.backend.locked(t, where, column, room))
                    .values(status=SessionStatus.EXPIRED.value, ended_at=now)
                )
                if keys:
                    rows = [
                        SessionKey._make(row) for row in await conn.execute(stmt.returning(*_KEY))
                    ]
                    expired.by_tenant.update(row.tenant_id for row in rows)
                    expired.rows.extend(rows)
                elif not self.backend.data_modifying_ctes:
                    tenants = await conn.execute(stmt.returning(t.c.tenant_id))
                    expired.by_tenant.update(tenants.scalars())
                else:
                    done = stmt.returning(t.c.tenant_id).cte("expired")
                    counted = select(done.c.tenant_id, func.count()).group_by(done.c.tenant_id)
                    for key, count in await conn.execute(counted):
                        expired.by_tenant[key] += count
        return expired

    async def usage_by_resource(self, conn: Connection, tenant: str) -> dict[str, float]:
        """Total use per resource type over the tenant's quotas."""
        q = quotas.c
        rows = await conn.execute(
            select(q.resource_type, func.sum(q.used))
            .where(q.tenant_id == tenant)
            .group_by(q.resource_type)
        )
        return {r[0]: float(r[1]) for r in rows}

    async def set_tier(
        self, conn: Connection, tenant: str, session_id: str, tier: str, now: datetime
    ) -> Session | None:
        """Give the session ``tier``; the session after it, observed at ``now`` (its
        leases not counted), or None when it does not exist."""
        stmt = (
            update(t)
            .where(of_session(t, tenant, session_id))
            .values(tier=tier)
            .returning(*_COLUMNS)
        )
        row = (await conn.execute(stmt)).first()
        return None if row is None else _session(row, now)

    async def user_counts(self, conn: Connection, tenant: str, user_id: str) -> tuple[int, int]:
        """(all sessions, active sessions) of a user."""
        active = func.sum(case((t.c.status == SessionStatus.ACTIVE.value, 1), else_=0))
        row = (
            await conn.execute(
                select(func.count(), func.coalesce(active, 0)).where(
                    t.c.tenant_id == tenant, t.c.user_id == user_id
                )
            )
        ).one()
        return int(row[0]), int(row[1])

    async def release_leases(self, conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
        """Drop every concurrency lease of the given (tenant_id, session_id) sessions."""
        if keys:
            lc = leases.c
            await conn.execute(
                delete(leases).where(tuple_(lc.tenant_id, lc.session_id).in_(list(keys)))
            )

    async def release_leases_of_ended(self, conn: Connection, tenant: str | None) -> None:
        """Drop every concurrency lease held for a session that is no longer open (work
        proportional to the leases held, however many sessions ended)."""
        lc = leases.c
        ended = exists().where(
            t.c.tenant_id == lc.tenant_id,
            t.c.session_id == lc.session_id,
            t.c.status.not_in(_OPEN),
        )
        stmt = delete(leases).where(ended)
        if tenant is not None:
            stmt = stmt.where(lc.tenant_id == tenant)
        await conn.execute(stmt)

    async def insert_with_chat(
        self, conn: Connection, values: dict[str, Any], chat: dict[str, Any], now: datetime
    ) -> Session | None:
        """Insert the session and its first chat in ONE statement (a data-modifying CTE,
        :attr:`Backend.data_modifying_ctes`): the chat row is inserted only if the session
        row was. The new session observed at ``now``, or None when the id exists (nothing
        written)."""
        shape = (tuple(values), tuple(chat))
        stmt = self._inserts_with_chat.get(shape)
        if stmt is None:
            stmt = self._inserts_with_chat[shape] = _insert_with_chat(self.backend, *shape)
        params = {f"s_{k}": v for k, v in values.items()} | {f"c_{k}": v for k, v in chat.items()}
        row = (await run(conn, stmt, params)).first()
        return None if row is None else _session(row, now)

    async def delete(self, conn: Connection, tenant: str, session_id: str) -> bool:
        """Delete the session; owned rows go by ON DELETE CASCADE, its rate limits and
        the memory items narrowed to it here."""
        result = await conn.execute(delete(t).where(of_session(t, tenant, session_id)))
        for narrowed in (memory_items, memories):  # memory narrowed to the session
            await conn.execute(delete(narrowed).where(of_session(narrowed, tenant, session_id)))
        for table in (rate_limit_rules, rate_limit_state):
            await conn.execute(
                delete(table).where(
                    table.c.tenant_id == tenant,
                    table.c.scope == "session",
                    table.c.subject == session_id,
                )
            )
        return bool(result.rowcount)

    async def drop_orphan_limits(self, conn: Connection, tenant: str) -> None:
        """Delete per-session rate-limit rules and state of sessions that are gone."""
        for table in (rate_limit_rules, rate_limit_state):
            gone = ~exists().where(
                t.c.tenant_id == table.c.tenant_id, t.c.session_id == table.c.subject
            )
            await conn.execute(
                delete(table).where(table.c.tenant_id == tenant, table.c.scope == "session", gone)
            )

    async def purge(
        self,
        conn: Connection,
        tenant: str,
        ended_before: datetime,
        statuses: Sequence[SessionStatus],
    ) -> int:
        result = await conn.execute(
            delete(t)
            .where(
                t.c.tenant_id == tenant,
                t.c.status.in_([s.value for s in statuses]),
                t.c.ended_at < ended_before,
            )
            .returning(t.c.session_id)
        )
        purged = list(result.scalars())
        if purged:
            await self.drop_orphan_limits(conn, tenant)
            for start in range(0, len(purged), 500):  # the memory narrowed to them
                chunk = purged[start : start + 500]
                for narrowed in (memory_items, memories):
                    m = narrowed.c
                    await conn.execute(
                        delete(narrowed).where(m.tenant_id == tenant, m.session_id.in_(chunk))
                    )
        return len(purged)
