"""Memory in bulk (SPEC §13): every key-value item and semantic memory of one user, read
for an export or an overview and written back by an import."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    ColumnElement,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
)

from ...models import MemoryItem, MemoryRecord
from ..connection import Connection
from ..schema import memories, memory_items
from ..types import JSONDocument, UTCDateTime
from . import Repository
from .memory import _beyond
from .semantic_memory import RECORD_COLUMNS, record_of

T = TypeVar("T")

i = memory_items.c
m = memories.c

#: Ids one IN list holds (well below every backend's limit on bound parameters).
CHUNK = 500


def _chunks(values: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


class ItemRow(NamedTuple):
    """A stored key-value item, as an export holds it."""

    session_id: str
    namespace: str
    key: str
    value: Any
    version: int
    created_at: datetime
    updated_at: datetime
    expires_at: datetime | None


class MemoryRow(NamedTuple):
    """A stored semantic memory with its vector (``dimensions`` little-endian float32s)."""

    memory_id: str
    session_id: str
    namespace: str
    text: str
    metadata: dict[str, Any]
    importance: float
    created_at: datetime
    last_accessed_at: datetime
    expires_at: datetime | None
    source: str | None
    dimensions: int
    embedding: bytes


class Holder(NamedTuple):
    """A memory that holds an id or a source: whose it is, and whether it is live."""

    memory_id: str
    user_id: str
    source: str | None
    alive: bool


def _alive(expires_at: Any, now: Any) -> ColumnElement[bool]:
    return or_(expires_at.is_(None), expires_at > now)


_ITEM_COLUMNS = (
    i.session_id,
    i.namespace,
    i.key,
    i.value,
    i.version,
    i.created_at,
    i.updated_at,
    i.expires_at,
)
_MEMORY_COLUMNS = (
    m.memory_id,
    m.session_id,
    m.namespace,
    m.text,
    m.metadata,
    m.importance,
    m.created_at,
    m.last_accessed_at,
    m.expires_at,
    m.source,
    m.dimensions,
    m.embedding,
)
_INSERT_MEMORY = insert(memories)


def _item(row: Any, user_id: str) -> MemoryItem:
    return MemoryItem._trusted(
        {
            "key": row.key,
            "value": row.value,
            "version": int(row.version),
            "user_id": user_id or None,
            "session_id": row.session_id or None,
            "namespace": row.namespace,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "expires_at": row.expires_at,
        }
    )


class MemoryTransferRepository(Repository):
    """The statements of export, import and the overview of a user's memory."""

    def __init__(self, backend: Any) -> None:
        super().__init__(backend)
        now = bindparam("now", type_=UTCDateTime())
        alive = _alive(i.expires_at, now)  # of the stored row, in the conflict's UPDATE
        values = {
            "tenant_id": bindparam("tenant_id"),
            "user_id": bindparam("user_id"),
            "session_id": bindparam("session_id"),
            "namespace": bindparam("namespace"),
            "key": bindparam("key", type_=i.key.type),
            "value": bindparam("value", type_=JSONDocument),
            "version": bindparam("version"),
            "created_at": bindparam("created_at", type_=UTCDateTime()),
            "updated_at": bindparam("updated_at", type_=UTCDateTime()),
            "expires_at": bindparam("expires_at", type_=UTCDateTime()),
        }

        def overwrite(excluded: Any) -> dict[str, Any]:
            # over a live item: a write as remember's (one version more, now);
            # over an expired one (absent to every call): the exported item as it was
            return {
                "value": excluded.value,
                "version": case((alive, i.version + 1), else_=excluded.version),
                "created_at": case((alive, i.created_at), else_=excluded.created_at),
                "updated_at": case((alive, now), else_=excluded.updated_at),
                "expires_at": excluded.expires_at,
                "ttl_seconds": None,  # an export holds the expiry, not the TTL it came from
            }

        key = [col.key for col in memory_items.primary_key.columns]
        self._put_item = backend.upsert(memory_items, key, values, overwrite)

    # -- reading -------------------------------------------------------------------------
    async def items(
        self, conn: Connection, tenant: str, user_id: str, namespace: str | None, now: datetime
    ) -> list[ItemRow]:
        """The live items of the user's scopes (their sessions' included), of one
        namespace or all, by namespace, session and key."""
        where = [i.tenant_id == tenant, i.user_id == user_id, _alive(i.expires_at, now)]
        if namespace is not None:
            where.append(i.namespace == namespace)
        stmt = select(*_ITEM_COLUMNS).where(*where).order_by(i.namespace, i.session_id, i.key)
        return [ItemRow(*row) for row in await conn.execute(stmt)]

    async def memories(
        self, conn: Connection, tenant: str, user_id: str, namespace: str | None, now: datetime
    ) -> list[MemoryRow]:
        """The live semantic memories of the user's scopes with their vectors, oldest
        first."""
        where = [m.tenant_id == tenant, m.user_id == user_id, _alive(m.expires_at, now)]
        if namespace is not None:
            where.append(m.namespace == namespace)
        stmt = select(*_MEMORY_COLUMNS).where(*where).order_by(m.created_at, m.memory_id)
        return [
            MemoryRow(
                memory_id=row[0],
                session_id=row[1],
                namespace=row[2],
                text=row[3],
                metadata=row[4],
                importance=float(row[5]),
                created_at=row[6],
                last_accessed_at=row[7],
                expires_at=row[8],
                source=row[9],
                dimensions=int(row[10]),
                embedding=bytes(row[11]),
            )
            for row in await conn.execute(stmt)
        ]

    async def item_counts(
        self,
        conn: Connection,
        tenant: str,
        user_id: str,
        namespace: str | None,
        prefix: str | None,
        now: datetime,
    ) -> dict[str, int]:
        """Live items of the user's scopes per namespace (keys starting with ``prefix``)."""
        where = self._item_filter(tenant, user_id, namespace, prefix, now)
        stmt = select(i.namespace, func.count()).where(*where).group_by(i.namespace)
        return {row[0]: int(row[1]) for row in await conn.execute(stmt)}

    async def first_items(
        self,
        conn: Connection,
        tenant: str,
        user_id: str,
        namespace: str | None,
        prefix: str | None,
        limit: int,
        now: datetime,
    ) -> list[MemoryItem]:
        """The first ``limit`` live items of the user's scopes, by namespace, key and
        session."""
        where = self._item_filter(tenant, user_id, namespace, prefix, now)
        stmt = (
            select(*_ITEM_COLUMNS)
            .where(*where)
            .order_by(i.namespace, i.key, i.session_id)
            .limit(limit)
        )
        return [_item(row, user_id) for row in await conn.execute(stmt)]

    async def memory_counts(
        self, conn: Connection, tenant: str, user_id: str, namespace: str | None, now: datetime
    ) -> dict[str, int]:
        """Live semantic memories of the user's scopes per namespace."""
        where = [m.tenant_id == tenant, m.user_id == user_id, _alive(m.expires_at, now)]
        if namespace is not None:
            where.append(m.namespace == namespace)
        stmt = select(m.namespace, func.count()).where(*where).group_by(m.namespace)
        return {row[0]: int(row[1]) for row in await conn.execute(stmt)}

    async def first_memories(
        self,
        conn: Connection,
        tenant: str,
        user_id: str,
        namespace: str | None,
        limit: int,
        by_importance: bool,
        now: datetime,
    ) -> list[MemoryRecord]:
        """The first ``limit`` live semantic memories of the user's scopes (without
        vectors), newest first, or most important first, then newest."""
        where = [m.tenant_id == tenant, m.user_id == user_id, _alive(m.expires_at, now)]
        if namespace is not None:
            where.append(m.namespace == namespace)
        order = [m.created_at.desc(), m.memory_id.desc()]
        if by_importance:
            order.insert(0, m.importance.desc())
        stmt = select(*RECORD_COLUMNS).where(*where).order_by(*order).limit(limit)
        return [record_of(row) for row in await conn.execute(stmt)]

    @staticmethod
    def _item_filter(
        tenant: str, user_id: str, namespace: str | None, prefix: str | None, now: datetime
    ) -> list[ColumnElement[bool]]:
        where = [i.tenant_id == tenant, i.user_id == user_id, _alive(i.expires_at, now)]
        if namespace is not None:
            where.append(i.namespace == namespace)
        if prefix is not None:  # one range of keys, as list_memories reads
            where += [i.key >= prefix, i.key < _beyond(prefix)]
        return where

    async def live_values(
        self,
        conn: Connection,
        tenant: str,
        user_id: str,
        namespaces: Iterable[str],
        now: datetime,
    ) -> dict[tuple[str, str, str], tuple[Any, datetime | None]]:
        """The value and expiry of each live item of the user's scopes in
        ``namespaces``, by (session, namespace, key)."""
        found: dict[tuple[str, str, str], tuple[Any, datetime | None]] = {}
        for chunk in _chunks(sorted(set(namespaces))):
            stmt = select(i.session_id, i.namespace, i.key, i.value, i.expires_at).where(
                i.tenant_id == tenant,
                i.user_id == user_id,
                i.namespace.in_(list(chunk)),
                _alive(i.expires_at, now),
            )
            for row in await conn.execute(stmt):
                found[row[0], row[1], row[2]] = (row[3], row[4])
        return found

    async def holders(
        self,
        conn: Connection,
        tenant: str,
        memory_ids: Sequence[str],
        sources: Sequence[str],
        now: datetime,
    ) -> list[Holder]:
        """The memories of the tenant (expired ones too) whose id is one of
        ``memory_ids`` or whose source is one of ``sources``."""
        found: dict[str, Holder] = {}
        alive = _alive(m.expires_at, now)
        columns = (m.memory_id, m.user_id, m.source, case((alive, True), else_=False))
        for column, values in ((m.memory_id, memory_ids), (m.source, sources)):
            for chunk in _chunks(sorted(set(values))):
                stmt = select(*columns).where(m.tenant_id == tenant, column.in_(list(chunk)))
                for row in await conn.execute(stmt):
                    found[row[0]] = Holder(row[0], row[1], row[2], bool(row[3]))
        return list(found.values())

    # -- writing -------------------------------------------------------------------------
    async def put_items(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Write items (dicts of every column, and ``now``): a key with no live item
        gets the row as given; a live item is overwritten, one version more."""
        for chunk in _chunks(rows):
            await conn.execute(self._put_item, list(chunk))

    async def delete_memories(
        self, conn: Connection, tenant: str, memory_ids: Sequence[str]
    ) -> int:
        """Delete memories by id; how many."""
        deleted = 0
        for chunk in _chunks(sorted(set(memory_ids))):
            stmt = delete(memories).where(m.tenant_id == tenant, m.memory_id.in_(list(chunk)))
            deleted += int((await conn.execute(stmt)).rowcount)
        return deleted

    async def insert_memories(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert memories (dicts of every column)."""
        for chunk in _chunks(rows):
            await conn.execute(_INSERT_MEMORY, list(chunk))


__all__ = ["Holder", "ItemRow", "MemoryRow", "MemoryTransferRepository"]
