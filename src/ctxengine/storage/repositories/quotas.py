"""SQL for quotas (one counter row per session and resource) and usage records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import (
    ColumnElement,
    Double,
    Integer,
    String,
    and_,
    bindparam,
    case,
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
from sqlalchemy.types import TypeEngine

from ...lifecycle import epoch
from ...models import UsageRecord
from ..backend import Backend, batch_document
from ..connection import Connection
from ..prebuilt import run
from ..schema import quotas, usage_records
from ..schema import sessions as s
from . import (
    Repository,
    abort_unless,
    after_locking,
    locked_in_key_order,
    of_session,
    written_or_abort,
)
from .sessions import CAN_WORK, TOUCH_WORKING, TOUCHED

_Q_KEY = ("tenant_id", "session_id", "resource_type")
#: The limit set_quota() set on a quota (parameters tenant, sid, resource).
_CUSTOM_LIMIT = select(quotas.c.quota_limit).where(
    quotas.c.tenant_id == bindparam("tenant"),
    quotas.c.session_id == bindparam("sid"),
    quotas.c.resource_type == bindparam("resource"),
    quotas.c.custom.is_(True),
)
#: The columns of a UsageRecord, in the order of its fields.
_RECORD_FIELDS = tuple(UsageRecord.model_fields)
_RECORD = [usage_records.c[name] for name in _RECORD_FIELDS]
_INSERT_RECORD = insert(usage_records)
#: The user and tier of a session that can work (parameters tenant, sid, now, now_epoch).
_WORKING = select(s.c.user_id, s.c.tier).where(
    s.c.tenant_id == bindparam("tenant"), s.c.session_id == bindparam("sid"), CAN_WORK
)
#: Touch a session that can work (parameters tenant, sid, now, now_epoch).
_TOUCH = TOUCH_WORKING.returning(s.c.session_id)


def _fits(amount: ColumnElement[Any]) -> ColumnElement[bool]:
    """The quota row can take ``amount``."""
    return or_(quotas.c.quota_limit.is_(None), quotas.c.used + amount <= quotas.c.quota_limit)


def _add_used(backend: Backend, rows: Any) -> Any:
    """Insert the quota ``rows``, or add their ``used`` to the rows there, where that
    keeps within the row's limit (checked on the locked row)."""
    return backend.upsert(
        quotas,
        _Q_KEY,
        rows,
        lambda excluded: {"used": quotas.c.used + excluded.used},
        lambda excluded: _fits(excluded.used),
    )


#: The quota row can take ``amount`` (parameters: amount).
_FITS = _fits(bindparam("amount"))
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
    tier_limit = _by_tier(s.c.tier, tier_limits)
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
    counted = _add_used(backend, new_row).returning(q.used, q.quota_limit).cte("counted")
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


def _by_tier(tier: ColumnElement[Any], limits: Mapping[str, float]) -> ColumnElement[Any]:
    """The limit ``limits`` gives the session's ``tier`` (NULL, unlimited, for others)."""
    if not limits:
        return null()
    by_tier = {name: literal(limit, quotas.c.quota_limit.type) for name, limit in limits.items()}
    return case(by_tier, value=tier, else_=null())


#: The rows of a ``track_many`` batch: one per call, ``k`` its place in the batch.
_BATCH_COLUMNS: dict[str, TypeEngine[Any]] = {
    "k": Integer(),
    "tenant": String(),
    "sid": String(),
    "resource": String(),
    "amount": Double(),
    "record_id": String(),
    "operation": String(),
    "meta": usage_records.c.metadata.type,
}


def _track_batch(backend: Backend, tier_limits: Mapping[str, Mapping[str, float]]) -> Any:
    """ONE statement for a batch of track_usage calls (data-modifying CTEs; parameters
    batch, now, now_epoch): ``_track`` for every call of the batch that fits, as if
    they ran one after another in batch order (``k``).

    In the snapshot, a call fits when its session can work and its quota's ``used``
    plus the running sum of the batch's amounts on that quota up to it is within the
    quota's limit (a new row's: the one ``tier_limits``, resource → tier → limit, gives
    the session's tier); as amounts are positive, the calls that fit are a prefix of
    each quota's calls. Their sessions are touched (locked, in key order) where they
    still can work, for the same user and tier; only then (all touched) each of their
    quotas gets its calls' sum in one upsert, in key order, where the locked row still
    has room; their usage records are inserted. It returns (k, user_id) of every call
    written and (tenant, sid, resource, used, limit) of every quota row after the
    batch, the other columns NULL. When the locks found a session or a quota changed
    since the snapshot, the statement aborts, as ``written_or_abort``'s do. (No join
    between the CTEs' results: the planner, which cannot count their rows, would
    nest their loops.)"""
    b = backend.batch_rows("batch", _BATCH_COLUMNS)
    q = quotas.c
    by_resource = {name: _by_tier(s.c.tier, limits) for name, limits in tier_limits.items()}
    tier_limit = case(by_resource, value=b.c.resource, else_=null()) if by_resource else null()
    # the sum of the batch's amounts on the call's quota, up to it: the upsert adds the
    # last one's, so the check in the snapshot and the one on the locked row agree
    running = func.sum(b.c.amount).over(
        partition_by=(b.c.tenant, b.c.sid, b.c.resource), order_by=b.c.k
    )
    ranked = (
        select(
            *b.c,
            s.c.user_id,
            s.c.tier,
            running.label("running"),
            func.coalesce(q.used, 0.0).label("used_before"),
            case((q.tenant_id.is_(None), tier_limit), else_=q.quota_limit).label("lim"),
        )
        .select_from(
            b.join(
                s, and_(s.c.tenant_id == b.c.tenant, s.c.session_id == b.c.sid, CAN_WORK)
            ).outerjoin(
                quotas,
                and_(
                    q.tenant_id == b.c.tenant,
                    q.session_id == b.c.sid,
                    q.resource_type == b.c.resource,
                ),
            )
        )
        .cte("ranked")
    )
    r = ranked.c
    fit = select(ranked).where(or_(r.lim.is_(None), r.used_before + r.running <= r.lim)).cte("fit")
    f = fit.c
    keys = (
        select(f.tenant, f.sid, f.user_id, f.tier).distinct().order_by(f.tenant, f.sid).cte("keys")
    )
    sessions_locked = locked_in_key_order(
        s, keys, (s.c.tenant_id == keys.c.tenant, s.c.session_id == keys.c.sid)
    )
    touched = (
        update(s)
        .where(
            s.c.tenant_id == keys.c.tenant,
            s.c.session_id == keys.c.sid,
            s.c.user_id == keys.c.user_id,
            s.c.tier == keys.c.tier,
            CAN_WORK,
            after_locking(sessions_locked),
        )
        .values(**TOUCHED)
        .returning(s.c.session_id)
        .cte("touched")
    )

    def count(rows: Any) -> Any:
        return select(func.count()).select_from(rows).scalar_subquery()

    # counting the touched sessions takes their locks before any quota row's
    sums = (
        select(
            f.tenant.label("tenant_id"),
            f.sid.label("session_id"),
            f.resource.label("resource_type"),
            func.max(f.running).label("used"),
            f.lim.label("quota_limit"),
            false().label("custom"),
        )
        .where(count(touched) == count(keys))
        .group_by(f.tenant, f.sid, f.resource, f.lim)
        .order_by(f.tenant, f.sid, f.resource)
    )
    counted = (
        _add_used(backend, sums)
        .returning(q.tenant_id, q.session_id, q.resource_type, q.used, q.quota_limit)
        .cte("counted")
    )
    record = select(
        f.tenant,
        f.record_id,
        f.sid,
        f.user_id,
        f.operation,
        f.resource,
        f.amount,
        f.meta,
        bindparam("now", type_=usage_records.c.created_at.type),
    )
    recorded = insert(usage_records).from_select([c.name for c in usage_records.c], record)
    quota_keys = select(f.tenant, f.sid, f.resource).distinct().subquery("quota_keys")
    every_quota_counted = count(counted) == count(quota_keys)
    abort_unless_counted = abort_unless(every_quota_counted)
    calls = select(
        f.k,
        f.user_id,
        *(null() for _ in range(5)),
        abort_unless_counted,
    )
    rows = select(
        null(),
        null(),
        counted.c.tenant_id,
        counted.c.session_id,
        counted.c.resource_type,
        counted.c.used,
        counted.c.quota_limit,
        null(),
    )
    return calls.union_all(rows).add_cte(recorded.cte("recorded"))


class Counted(NamedTuple):
    """A quota row after an amount was added: what is used, and its limit (None:
    unlimited)."""

    used: float
    limit: float | None


class Recorded(NamedTuple):
    """What ``track`` wrote: whose session it is, and the quota row after the amount."""

    user_id: str
    used: float
    limit: float | None


class QuotaRow(NamedTuple):
    """A stored quota: what is used, its limit (None: unlimited), and whether
    ``set_quota`` set that limit (else it is the tier's)."""

    used: float
    limit: float | None
    custom: bool


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Filters of get_usage_history."""

    user_id: str | None = None
    session_id: str | None = None
    resource_type: str | None = None
    operation: str | None = None
    since: datetime | None = None


class QuotaRepository(Repository):
    """Every statement on the quota and usage record tables."""

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        q = quotas.c
        #: Add to the row, creating it with the tier's limit (parameters: tenant, sid,
        #: resource, amount, limit); built once, as building costs more than running it.
        self._add_or_create = _add_used(
            backend,
            {
                "tenant_id": bindparam("tenant"),
                "session_id": bindparam("sid"),
                "resource_type": bindparam("resource"),
                "used": bindparam("amount"),
                "quota_limit": bindparam("limit"),
                "custom": False,
            },
        ).returning(q.used, q.quota_limit)
        #: ``_track`` statements, by the tier limits they were built for.
        self._tracks: dict[tuple[tuple[str, float], ...], Any] = {}
        #: ``_track_batch`` statements, by the tier limits they were built for.
        self._batches: dict[tuple[tuple[str, tuple[tuple[str, float], ...]], ...], Any] = {}

    # -- quotas -------------------------------------------------------------------------
    async def add_to_quota(
        self,
        conn: Connection,
        tenant: str,
        session_id: str,
        resource_type: str,
        amount: float,
        tier_limit: float | None,
    ) -> Counted | None:
        """Add ``amount`` if it fits under the row's limit (the tier's limit for a new
        row); the row after it, or None when it does not fit."""
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
        return None if row is None else Counted(float(row[0]), _opt_float(row[1]))

    async def track(
        self,
        conn: Connection,
        record: dict[str, Any],
        tier_limits: tuple[tuple[str, float], ...],
    ) -> Recorded | None:
        """Touch the session, count ``record`` (usage record values without user_id)
        against its quota, insert it, in ONE statement (:attr:`Backend.data_modifying_ctes`),
        if the session can work and the quota has room (a new quota row gets the limit
        ``tier_limits``, (tier, limit) pairs, gives the session's tier). What was
        written, or None when nothing was."""
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
        return None if row is None else Recorded(row[0], float(row[1]), _opt_float(row[2]))

    async def track_many(
        self,
        conn: Connection,
        records: Sequence[dict[str, Any]],
        tier_limits: Mapping[str, tuple[tuple[str, float], ...]],
    ) -> list[Recorded | None]:
        """:meth:`track` of several calls (``records`` with the same ``created_at``; a
        resource's tier limits in ``tier_limits``), as if they ran one after another in
        order: what each would have returned, or None where nothing was written for it
        (its session cannot work, or its quota has no room for it after the calls
        before it). Each call's ``used`` is its quota row's right after its own amount.
        In ONE statement (a batch of one: :meth:`track`'s), where none after a call that
        does not fit its quota is written to that quota either; where one statement
        cannot write a batch (SQLite), each call's own statements, one after another
        (:meth:`_track_each`)."""
        if not self.writes_at_once:
            return await self._track_each(conn, records, tier_limits)
        if len(records) == 1:
            record = records[0]
            return [await self.track(conn, record, tier_limits[record["resource_type"]])]
        shape = tuple(sorted(tier_limits.items()))
        stmt = self._batches.get(shape)
        if stmt is None:
            limits = {resource: dict(pairs) for resource, pairs in shape if pairs}
            stmt = self._batches[shape] = _track_batch(self.backend, limits)
        rows = [
            {
                "k": k,
                "tenant": r["tenant_id"],
                "sid": r["session_id"],
                "resource": r["resource_type"],
                "amount": r["amount"],
                "record_id": r["record_id"],
                "operation": r["operation"],
                "meta": r["metadata"],
            }
            for k, r in enumerate(records)
        ]
        now = records[0]["created_at"]
        params = {"batch": batch_document(rows), "now": now, "now_epoch": epoch(now)}
        written: dict[int, str] = {}
        counted: dict[tuple[str, str, str], tuple[float, float | None]] = {}
        for row in await run(conn, stmt, params):
            if row[0] is None:
                counted[(row[2], row[3], row[4])] = (float(row[5]), _opt_float(row[6]))
            else:
                written[row[0]] = row[1]
        # each call sees its quota row right after its own amount: the row's after the
        # batch, less the amounts of the calls after it on that quota
        results: list[Recorded | None] = [None] * len(records)
        after: dict[tuple[str, str, str], float] = {}
        for k in sorted(written, reverse=True):
            record = records[k]
            quota = (record["tenant_id"], record["session_id"], record["resource_type"])
            used, limit = counted[quota]
            used = after.get(quota, used)
            results[k] = Recorded(written[k], used, limit)
            after[quota] = used - record["amount"]
        return results

    async def _track_each(
        self,
        conn: Connection,
        records: Sequence[dict[str, Any]],
        tier_limits: Mapping[str, tuple[tuple[str, float], ...]],
    ) -> list[Recorded | None]:
        """:meth:`track_many` call after call in the caller's write transaction, which
        holds the database's write lock (SQLite): each call is written if its session
        can work and its quota has room for it as the calls before it left the quota
        (the calls of a batch are concurrent: one not written goes after those that
        are, as it would run after them)."""
        written: list[Recorded | None] = []
        for record in records:
            now = record["created_at"]
            quota = (record["tenant_id"], record["session_id"], record["resource_type"])
            stamp = {"tenant": quota[0], "sid": quota[1], "now": now, "now_epoch": epoch(now)}
            working = (await run(conn, _WORKING, stamp)).first()
            counted = None
            if working is not None:
                limit = dict(tier_limits[quota[2]]).get(working[1])
                counted = await self.add_to_quota(conn, *quota, record["amount"], limit)
            if working is None or counted is None:
                written.append(None)
                continue
            await run(conn, _TOUCH, stamp)
            await self.insert_record(conn, record | {"user_id": working[0]})
            written.append(Recorded(working[0], counted.used, counted.limit))
        return written

    async def quota_rows(
        self, conn: Connection, tenant: str, session_id: str
    ) -> dict[str, QuotaRow]:
        """resource_type → its stored quota, for the rows that exist."""
        q = quotas.c
        rows = await conn.execute(
            select(q.resource_type, q.used, q.quota_limit, q.custom).where(
                of_session(quotas, tenant, session_id)
            )
        )
        return {r[0]: QuotaRow(float(r[1]), _opt_float(r[2]), bool(r[3])) for r in rows}

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
        params = {"tenant": tenant, "sid": session_id, "resource": resource_type}
        row = (await run(conn, _CUSTOM_LIMIT, params)).first()
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
    ) -> list[UsageRecord]:
        """The tenant's usage records that ``f`` selects, newest first."""
        u = usage_records.c
        stmt = select(*_RECORD).where(u.tenant_id == tenant)
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
        # validated, as records are built from their values (the resource type's enum)
        rows = await conn.execute(stmt)
        return [UsageRecord(**dict(zip(_RECORD_FIELDS, row, strict=True))) for row in rows]

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


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
