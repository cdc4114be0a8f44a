"""Key-value memory (SPEC §13): one statement per write, compare-and-set in SQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Double,
    Integer,
    Table,
    and_,
    bindparam,
    case,
    delete,
    not_,
    or_,
    select,
    tuple_,
    update,
)

from ...models import MemoryItem
from ...validation import MAX_ID_LENGTH
from ..backend import first_locked
from ..connection import Connection
from ..prebuilt import Record, run
from ..schema import MEMORY_KEY, NO_SCOPE, memory_items
from ..types import JSONDocument, UTCDateTime
from . import Repository

if TYPE_CHECKING:
    from ..backend import Backend

t = memory_items
c = t.c


class MemoryScope(NamedTuple):
    """Where a memory lives: tenant, user ("" = tenant-wide), session ("" = not
    narrowed), namespace."""

    tenant_id: str
    user_id: str
    session_id: str
    namespace: str


_NOW = bindparam("now", type_=UTCDateTime())
_KEY = bindparam("key", type_=MEMORY_KEY)
#: The columns a MemoryItem is built from, in its fields' order.
_ITEM = (
    c.key,
    c.value,
    c.version,
    c.user_id,
    c.session_id,
    c.namespace,
    c.created_at,
    c.updated_at,
    c.expires_at,
)
_SCOPE = and_(
    c.tenant_id == bindparam("tenant"),
    c.user_id == bindparam("user"),
    c.session_id == bindparam("session"),
    c.namespace == bindparam("namespace"),
)
_ROW = and_(_SCOPE, c.key == _KEY)
#: Not expired at ``now`` (an expired item is absent to every call).
_ALIVE = or_(c.expires_at.is_(None), c.expires_at > _NOW)


def _item(row: Record) -> MemoryItem:
    return MemoryItem._trusted(
        {
            "key": row[0],
            "value": row[1],
            "version": row[2],
            "user_id": row[3] or None,
            "session_id": row[4] or None,
            "namespace": row[5],
            "created_at": row[6],
            "updated_at": row[7],
            "expires_at": row[8],
        }
    )


def _params(scope: MemoryScope, **more: Any) -> dict[str, Any]:
    return {
        "tenant": scope.tenant_id,
        "user": scope.user_id,
        "session": scope.session_id,
        "namespace": scope.namespace,
        **more,
    }


def _beyond(prefix: str) -> str:
    """A string after every key that starts with ``prefix`` and before every other key
    after it, in code point order (keys are at most MAX_ID_LENGTH characters): the
    prefix followed by more of the largest code point than any key can hold."""
    return prefix + "\U0010ffff" * (MAX_ID_LENGTH + 1)


def _page(*, prefix: bool, after: bool) -> Any:
    where: list[ColumnElement[bool]] = [_SCOPE, _ALIVE]
    if prefix:
        # one range of the key's index: every key starting with the prefix is at or
        # after it and before ``_beyond(prefix)``, in code point order
        where.append(c.key >= bindparam("prefix", type_=MEMORY_KEY))
        where.append(c.key < bindparam("beyond", type_=MEMORY_KEY))
    if after:
        where.append(c.key > bindparam("after", type_=MEMORY_KEY))
    return select(*_ITEM).where(*where).order_by(c.key).limit(bindparam("limit", type_=Integer))


_GET = select(*_ITEM).where(_ROW, _ALIVE)
_VERSION = select(c.version).where(_ROW, _ALIVE)
_FORGET = delete(t).where(_ROW, _ALIVE)
#: Write when the stored version is :expected (and alive): the one statement of a
#: compare-and-set on an item that exists. Concurrent writers of the same version wait
#: for the row lock, then find another version: exactly one wins.
_REPLACE = (
    update(t)
    .where(_ROW, _ALIVE, c.version == bindparam("expected", type_=BigInteger))
    .values(
        value=bindparam("value", type_=JSONDocument),
        version=c.version + 1,
        updated_at=_NOW,
        expires_at=bindparam("expires_at", type_=UTCDateTime()),
        ttl_seconds=bindparam("ttl_seconds", type_=Double()),
    )
    .returning(*_ITEM)
)
_PAGES = {(p, a): _page(prefix=p, after=a) for p in (False, True) for a in (False, True)}


class MemoryTable(Repository):
    """What every memory table shares: rows in a user's scopes, rows that expire."""

    table: ClassVar[Table]

    async def forget_user(self, conn: Connection, tenant: str, user_id: str) -> int:
        """Delete every row of the user's scopes (their sessions' included); how many."""
        rows = self.table.c
        stmt = delete(self.table).where(rows.tenant_id == tenant, rows.user_id == user_id)
        return int((await conn.execute(stmt)).rowcount)

    async def delete_expired(self, conn: Connection, now: datetime, limit: int) -> int:
        """Delete up to ``limit`` rows expired at ``now`` (rows another sweep holds
        locked are skipped); how many."""
        rows = self.table.c
        expired = [rows.expires_at.is_not(None), rows.expires_at <= now]
        key = list(self.table.primary_key.columns)
        found = first_locked(select(*key), expired, rows.expires_at, limit)
        stmt = delete(self.table).where(tuple_(*key).in_(found))
        return int((await conn.execute(stmt)).rowcount)


class MemoryRepository(MemoryTable):
    """The statements of key-value memory."""

    table = memory_items

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)

        def restarted(excluded: Any) -> dict[str, Any]:
            # an expired item is absent: writing it again starts it over at version 1
            return {
                "value": excluded.value,
                "version": case((_ALIVE, c.version + 1), else_=1),
                "created_at": case((_ALIVE, c.created_at), else_=excluded.created_at),
                "updated_at": excluded.updated_at,
                "expires_at": excluded.expires_at,
                "ttl_seconds": excluded.ttl_seconds,
            }

        values = {
            "tenant_id": bindparam("tenant"),
            "user_id": bindparam("user"),
            "session_id": bindparam("session"),
            "namespace": bindparam("namespace"),
            "key": _KEY,
            "value": bindparam("value", type_=JSONDocument),
            "version": 1,
            "created_at": _NOW,
            "updated_at": _NOW,
            "expires_at": bindparam("expires_at", type_=UTCDateTime()),
            "ttl_seconds": bindparam("ttl_seconds", type_=Double()),
        }
        key = [col.key for col in t.primary_key.columns]
        #: Create or overwrite, whatever is stored.
        self._put = backend.upsert(t, key, values, restarted).returning(*_ITEM)
        #: Create only where nothing is stored (or only an expired item).
        self._create = backend.upsert(
            t, key, values, restarted, where=lambda excluded: not_(_ALIVE)
        ).returning(*_ITEM)

    async def put(
        self,
        conn: Connection,
        scope: MemoryScope,
        key: str,
        value: Any,
        now: datetime,
        ttl: float | None,
        expected: int | None,
    ) -> MemoryItem | None:
        """Write the item in one statement, expiring ``ttl`` seconds from ``now`` (None:
        never), a TTL it keeps (``ttl_seconds``); None when ``expected`` (a version, 0 =
        absent) did not hold and nothing was written."""
        expires_at = None if ttl is None else now + timedelta(seconds=ttl)
        params = _params(
            scope, key=key, value=value, now=now, expires_at=expires_at, ttl_seconds=ttl
        )
        stmt: Any
        if expected is None:
            stmt = self._put
        elif expected == 0:
            stmt = self._create
        else:
            stmt = _REPLACE
            params["expected"] = expected
        row = (await run(conn, stmt, params)).first()
        return None if row is None else _item(row)

    async def get(
        self, conn: Connection, scope: MemoryScope, key: str, now: datetime
    ) -> MemoryItem | None:
        row = (await run(conn, _GET, _params(scope, key=key, now=now))).first()
        return None if row is None else _item(row)

    async def version(self, conn: Connection, scope: MemoryScope, key: str, now: datetime) -> int:
        """The stored version of a live item; 0 when there is none."""
        found = (await run(conn, _VERSION, _params(scope, key=key, now=now))).scalar_one_or_none()
        return 0 if found is None else int(found)

    async def forget(self, conn: Connection, scope: MemoryScope, key: str, now: datetime) -> bool:
        """Delete a live item; whether there was one."""
        return bool((await run(conn, _FORGET, _params(scope, key=key, now=now))).rowcount)

    async def page(
        self,
        conn: Connection,
        scope: MemoryScope,
        now: datetime,
        prefix: str | None,
        limit: int,
        after: str | None,
    ) -> list[MemoryItem]:
        """Live items of the scope in key order, after the key ``after``."""
        params = _params(scope, now=now, limit=limit)
        if prefix is not None:
            params["prefix"], params["beyond"] = prefix, _beyond(prefix)
        if after is not None:
            params["after"] = after
        stmt = _PAGES[prefix is not None, after is not None]
        return [_item(row) for row in await run(conn, stmt, params)]


__all__ = ["NO_SCOPE", "MemoryRepository", "MemoryScope", "MemoryTable"]
