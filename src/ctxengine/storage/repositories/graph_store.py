"""The LangGraph store's statements (``ContextEngineStore``) on SPEC §13's memory tables.

Items are tenant-wide key-value memories (user and session ""), their namespace the
LangGraph labels joined by "." (a label never holds one). An item's TTL (LangGraph
refreshes an item's expiry on reads by the TTL it was written with) is its row's
``ttl_seconds``, written with ``expires_at`` (migration 0014). Its vectors (with an
index configuration) are semantic memories with ids derived from the namespace and
key (``<base>.<i>``), each one's metadata naming the item (the first one's also how
many there are).

A namespace prefix is matched by equality on a leading substring: exact under any
collation, and the same on SQLite and PostgreSQL (no LIKE wildcards to escape).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    and_,
    bindparam,
    delete,
    func,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from ..connection import Connection
from ..prebuilt import run
from ..schema import MEMORY_KEY, NO_SCOPE, memories, memory_items
from ..types import UTCDateTime
from . import Repository

t = memory_items
c = t.c
m = memories.c

#: Rows one read of a filtered listing takes at a time.
PAGE = 200

_NOW = bindparam("now", type_=UTCDateTime())
_ALIVE = or_(c.expires_at.is_(None), c.expires_at > _NOW)
_SCOPE = and_(c.tenant_id == bindparam("tenant"), c.user_id == NO_SCOPE, c.session_id == NO_SCOPE)
#: In the namespace ``:namespace`` or under it (``:under`` is it and "."; ``:width``
#: its length in characters).
_UNDER = or_(
    c.namespace == bindparam("namespace"),
    func.substr(c.namespace, 1, bindparam("width", type_=Integer)) == bindparam("under"),
)
_ITEM_COLUMNS = (c.namespace, c.key, c.value, c.created_at, c.updated_at, c.expires_at)
_AFTER = tuple_(c.updated_at, c.namespace, c.key) < tuple_(
    bindparam("after_updated", type_=UTCDateTime()),
    bindparam("after_namespace"),
    bindparam("after_key", type_=MEMORY_KEY),
)


class StoredItem(NamedTuple):
    """A row of an item: namespace (joined), key, value, times."""

    namespace: str
    key: str
    value: Any
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


def _listing(*, prefix: bool, after: bool, offset: bool) -> Any:
    where: list[ColumnElement[bool]] = [_SCOPE, _ALIVE]
    if prefix:
        where.append(_UNDER)
    if after:
        where.append(_AFTER)
    stmt = (
        select(*_ITEM_COLUMNS)
        .where(*where)
        .order_by(c.updated_at.desc(), c.namespace.desc(), c.key.desc())
        .limit(bindparam("limit", type_=Integer))
    )
    if offset:
        stmt = stmt.offset(bindparam("offset", type_=Integer))
    return stmt


_LISTINGS = {
    (p, a, o): _listing(prefix=p, after=a, offset=o)
    for p in (False, True)
    for a in (False, True)
    for o in (False, True)
}
_NAMESPACES = {
    prefix: select(c.namespace)
    .where(_SCOPE, _ALIVE, *([_UNDER] if prefix else []))
    .distinct()
    .order_by(c.namespace)
    for prefix in (False, True)
}
_VECTOR_METADATA = select(m.metadata).where(
    m.tenant_id == bindparam("tenant"), m.memory_id == bindparam("id")
)
#: A vector's expiry (executemany).
_EXPIRE_VECTOR = (
    update(memories)
    .where(m.tenant_id == bindparam("tenant"), m.memory_id == bindparam("id"))
    .values(expires_at=bindparam("expires", type_=UTCDateTime()))
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _later(FunctionElement[datetime]):
    """``now`` (a UTCDateTime) plus ``seconds`` (a number), as the database stores a
    UTCDateTime: equal to Python's ``now + timedelta(seconds=...)`` (compared for
    3,000 random instants and TTLs on both backends: always under 10^7 s, within a
    microsecond beyond). Clauses: now, now in whole microseconds since the epoch,
    seconds."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(_later, "postgresql")
def _later_postgresql(element: _later, compiler: SQLCompiler, **kw: Any) -> str:
    now, _, seconds = element.clauses  # only what the SQL holds is compiled (bound)
    at, secs = compiler.process(now, **kw), compiler.process(seconds, **kw)
    # whole microseconds times an interval of one: exact (a float of seconds is cut)
    micros = f"CAST(round({secs} * 1000000) AS BIGINT)"
    return f"(CAST({at} AS TIMESTAMP WITH TIME ZONE) + {micros} * INTERVAL '1 microsecond')"


@compiles(_later, "sqlite")
def _later_sqlite(element: _later, compiler: SQLCompiler, **kw: Any) -> str:
    # UTCDateTime's text ("YYYY-MM-DD HH:MM:SS.ffffff") from whole microseconds: the
    # julian day numbers of SQLite's date functions are coarser than a microsecond
    _, micros, seconds = element.clauses
    base, secs = compiler.process(micros, **kw), compiler.process(seconds, **kw)
    at = f"({base} + CAST(round({secs} * 1000000) AS INTEGER))"
    return (
        f"(strftime('%Y-%m-%d %H:%M:%S', {at} / 1000000, 'unixepoch')"
        f" || '.' || substr('00000' || ({at} % 1000000), -6))"
    )


def _item(row: Sequence[Any]) -> StoredItem:
    return StoredItem(row[0], row[1], row[2], row[3], row[4], row[5])


def _prefix_params(prefix: str | None) -> dict[str, Any]:
    if prefix is None:
        return {}
    under = prefix + "."
    return {"namespace": prefix, "under": under, "width": len(under)}


class GraphStoreRepository(Repository):
    """Listings, namespaces, TTL refreshes and item vectors of the LangGraph store."""

    async def listing(
        self,
        conn: Connection,
        tenant: str,
        now: datetime,
        prefix: str | None,
        limit: int,
        *,
        offset: int = 0,
        after: StoredItem | None = None,
    ) -> list[StoredItem]:
        """Live items in or under the namespace ``prefix`` (None: all), most recently
        updated first (then namespace and key, descending), after ``after`` in that
        order."""
        params: dict[str, Any] = {"tenant": tenant, "now": now, "limit": limit}
        params.update(_prefix_params(prefix))
        if offset:
            params["offset"] = offset
        if after is not None:
            params["after_updated"] = after.updated_at
            params["after_namespace"] = after.namespace
            params["after_key"] = after.key
        stmt = _LISTINGS[prefix is not None, after is not None, bool(offset)]
        return [_item(row) for row in await run(conn, stmt, params)]

    async def items(
        self, conn: Connection, tenant: str, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> dict[tuple[str, str], StoredItem]:
        """The live items of (namespace, key) ``pairs``, by pair."""
        if not pairs:
            return {}
        stmt = select(*_ITEM_COLUMNS).where(
            c.tenant_id == tenant,
            c.user_id == NO_SCOPE,
            c.session_id == NO_SCOPE,
            tuple_(c.namespace, c.key).in_(list(pairs)),
            or_(c.expires_at.is_(None), c.expires_at > now),
        )
        found = (_item(row) for row in await conn.execute(stmt))
        return {(item.namespace, item.key): item for item in found}

    async def namespaces(
        self, conn: Connection, tenant: str, now: datetime, prefix: str | None
    ) -> list[str]:
        """The namespaces holding live items, in or under ``prefix`` (None: all)."""
        params: dict[str, Any] = {"tenant": tenant, "now": now, **_prefix_params(prefix)}
        return [row[0] for row in await run(conn, _NAMESPACES[prefix is not None], params)]

    async def refresh(
        self, conn: Connection, tenant: str, pairs: Sequence[tuple[str, str]], now: datetime
    ) -> list[tuple[str, str, datetime]]:
        """Start the expiry of the live items of ``pairs`` that have a TTL over, from
        ``now`` (``expires_at = now + ttl_seconds``), in one statement; (namespace,
        key, new expiry) of each."""
        if not pairs:
            return []
        micros = (now - _EPOCH) // timedelta(microseconds=1)
        stmt = (
            update(t)
            .where(
                c.tenant_id == tenant,
                c.user_id == NO_SCOPE,
                c.session_id == NO_SCOPE,
                tuple_(c.namespace, c.key).in_(list(pairs)),
                c.ttl_seconds.is_not(None),
                c.expires_at > now,
            )
            .values(
                expires_at=_later(
                    bindparam("now", now, type_=UTCDateTime()),
                    bindparam("now_micros", micros, type_=BigInteger()),
                    c.ttl_seconds,
                )
            )
            .returning(c.namespace, c.key, c.expires_at)
        )
        return [(row[0], row[1], row[2]) for row in await conn.execute(stmt)]

    async def vector_count(self, conn: Connection, tenant: str, first_id: str) -> int:
        """How many vectors the item whose first vector is ``first_id`` has (0: none)."""
        row = (await run(conn, _VECTOR_METADATA, {"tenant": tenant, "id": first_id})).first()
        if row is None or not isinstance(row[0], dict):
            return 0
        return int(row[0].get("count", 1))

    async def vector_counts(
        self, conn: Connection, tenant: str, first_ids: Sequence[str]
    ) -> dict[str, int]:
        """How many vectors each item whose first vector is one of ``first_ids`` has,
        by first id (absent: none)."""
        if not first_ids:
            return {}
        stmt = select(m.memory_id, m.metadata).where(
            m.tenant_id == tenant, m.memory_id.in_(list(first_ids))
        )
        return {
            row[0]: int(row[1].get("count", 1))
            for row in await conn.execute(stmt)
            if isinstance(row[1], dict)
        }

    async def delete_vectors(self, conn: Connection, tenant: str, ids: Sequence[str]) -> None:
        """Delete the memories ``ids`` (live or expired)."""
        if ids:
            stmt = delete(memories).where(m.tenant_id == tenant, m.memory_id.in_(list(ids)))
            await conn.execute(stmt)

    async def expire_vectors(
        self, conn: Connection, tenant: str, expiries: Sequence[tuple[str, datetime]]
    ) -> None:
        """Set the expiry of memories: (memory id, when), in one statement."""
        if expiries:
            params = [{"tenant": tenant, "id": i, "expires": when} for i, when in expiries]
            await conn.execute(_EXPIRE_VECTOR, params)

    async def owners(
        self, conn: Connection, tenant: str, ids: Sequence[str]
    ) -> dict[str, tuple[str, str]]:
        """The (namespace, key) of the item each of the vectors ``ids`` belongs to."""
        if not ids:
            return {}
        stmt = select(m.memory_id, m.metadata).where(
            m.tenant_id == tenant, m.memory_id.in_(list(ids))
        )
        found: dict[str, tuple[str, str]] = {}
        for memory_id, meta in await conn.execute(stmt):
            if isinstance(meta, dict) and "namespace" in meta and "key" in meta:
                found[memory_id] = (meta["namespace"], meta["key"])
        return found


__all__ = ["PAGE", "GraphStoreRepository", "StoredItem"]
