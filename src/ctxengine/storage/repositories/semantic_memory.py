"""Semantic memory (SPEC §13): memories and their vectors; the search itself compares
the vectors of a scope, read here, in the service."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import (
    and_,
    bindparam,
    delete,
    func,
    not_,
    or_,
    select,
    update,
)

from ...models import MemoryRecord
from ..connection import Connection
from ..prebuilt import Record, run, run_raw
from ..schema import memories
from ..types import UTCDateTime
from .memory import MemoryTable

if TYPE_CHECKING:
    from ..backend import Backend

t = memories
c = t.c

_NOW = bindparam("now", type_=UTCDateTime())
_ALIVE = or_(c.expires_at.is_(None), c.expires_at > _NOW)
#: The columns a MemoryRecord is built from, in its fields' order.
_RECORD = (
    c.memory_id,
    c.text,
    c.metadata,
    c.importance,
    c.user_id,
    c.session_id,
    c.namespace,
    c.created_at,
    c.last_accessed_at,
    c.expires_at,
    c.source,
)
_IN_NAMESPACE = and_(c.tenant_id == bindparam("tenant"), c.namespace == bindparam("namespace"))
_BY_SOURCE = select(*_RECORD).where(
    c.tenant_id == bindparam("tenant"), c.source == bindparam("source"), _ALIVE
)
_DIMENSIONS = select(c.dimensions).where(_IN_NAMESPACE).limit(1)
#: The vectors a search compares: live memories of the namespace whose user is one of
#: two (the same twice for one).
_OF_USERS = c.user_id.in_([bindparam("user_a"), bindparam("user_b")])
_CANDIDATES = select(c.memory_id, c.dimensions, c.embedding).where(_IN_NAMESPACE, _OF_USERS, _ALIVE)
_CANDIDATES_WITH_METADATA = select(c.memory_id, c.dimensions, c.embedding, c.metadata).where(
    _IN_NAMESPACE, _OF_USERS, _ALIVE
)
#: The columns of a candidate's row (C-level getters: no Python call per row).
_ID, _DIMS, _VECTOR, _METADATA = (itemgetter(i) for i in range(4))
#: A live memory (an expired one is absent, as to every call; the sweep deletes it).
_DELETE = delete(t).where(
    c.tenant_id == bindparam("tenant"), c.memory_id == bindparam("id"), _ALIVE
)


#: ``Vectors.dimensions`` of memories whose vectors differ in length (two first writes
#: of a namespace with different dimensions, at once: nothing serializes them).
MIXED = -1


class Vectors(NamedTuple):
    """The live memories a search compares: their ids, the dimension of their vectors,
    the vectors one after another (little-endian float32s) and, when the search
    filters on it, each one's metadata."""

    memory_ids: list[str]
    dimensions: int
    data: bytes
    metadata: list[dict[str, Any]] | None


def _record(row: Record) -> MemoryRecord:
    return MemoryRecord._trusted(
        {
            "memory_id": row[0],
            "text": row[1],
            "metadata": row[2],
            "importance": float(row[3]),
            "user_id": row[4] or None,
            "session_id": row[5] or None,
            "namespace": row[6],
            "created_at": row[7],
            "last_accessed_at": row[8],
            "expires_at": row[9],
            "source": row[10],
        }
    )


class SemanticMemoryRepository(MemoryTable):
    """The statements of semantic memory."""

    table = memories

    async def dimensions(self, conn: Connection, tenant: str, namespace: str) -> int | None:
        """The dimension of the vectors stored in the namespace; None when it holds none."""
        found = (await run(conn, _DIMENSIONS, {"tenant": tenant, "namespace": namespace})).first()
        return None if found is None else int(found[0])

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        names = [column.key for column in t.columns]

        def replaced(excluded: Any) -> dict[str, Any]:
            return {name: excluded[name] for name in names if name not in ("tenant_id", "source")}

        #: Insert a memory; one whose source a live memory has already writes nothing
        #: (an expired one with that source is replaced: expired memories are absent).
        self._insert = backend.upsert(
            t,
            ["tenant_id", "source"],
            {name: bindparam(name, type_=t.c[name].type) for name in names},
            replaced,
            where=lambda excluded: not_(_ALIVE),
        )
        #: The user's live memories beyond the ``keep`` they keep longest: lowest
        #: importance first, then least recently accessed.
        ranked = (
            select(c.memory_id)
            .where(c.tenant_id == bindparam("tenant"), c.user_id == bindparam("user"), _ALIVE)
            .order_by(
                c.importance.desc(),
                c.last_accessed_at.desc(),
                c.created_at.desc(),
                c.memory_id.desc(),
            )
            .offset(bindparam("keep"))
        )
        self._evict = (
            delete(t)
            .where(c.tenant_id == bindparam("tenant"), c.memory_id.in_(ranked.scalar_subquery()))
            .returning(c.memory_id)
        )

    async def insert(self, conn: Connection, row: dict[str, Any]) -> MemoryRecord | None:
        """Insert the memory of ``row`` (every column) and return it; None when a live
        memory of the tenant has its ``source`` (nothing is written)."""
        params = dict(row, now=row["created_at"])
        if not (await run(conn, self._insert, params)).rowcount:
            return None
        return MemoryRecord._trusted(
            {
                "memory_id": row["memory_id"],
                "text": row["text"],
                "metadata": row["metadata"],
                "importance": row["importance"],
                "user_id": row["user_id"] or None,
                "session_id": row["session_id"] or None,
                "namespace": row["namespace"],
                "created_at": row["created_at"],
                "last_accessed_at": row["last_accessed_at"],
                "expires_at": row["expires_at"],
                "source": row["source"],
            }
        )

    async def by_source(
        self, conn: Connection, tenant: str, source: str, now: datetime
    ) -> MemoryRecord | None:
        """The live memory of the tenant that came from ``source``."""
        params = {"tenant": tenant, "source": source, "now": now}
        found = (await run(conn, _BY_SOURCE, params)).first()
        return None if found is None else _record(found)

    async def sources(
        self, conn: Connection, tenant: str, sources: Sequence[str], now: datetime
    ) -> set[str]:
        """Which of ``sources`` live memories of the tenant came from."""
        if not sources:
            return set()
        stmt = select(c.source).where(
            c.tenant_id == tenant,
            c.source.in_(list(sources)),
            or_(c.expires_at.is_(None), c.expires_at > now),
        )
        return {row[0] for row in await conn.execute(stmt)}

    async def evict(
        self, conn: Connection, tenant: str, user_id: str, keep: int, now: datetime
    ) -> list[str]:
        """Delete the user's live memories beyond the ``keep`` with the highest
        importance, then the most recently accessed; the ids deleted."""
        params = {"tenant": tenant, "user": user_id, "keep": keep, "now": now}
        return [row[0] for row in await run(conn, self._evict, params)]

    async def candidates(
        self,
        conn: Connection,
        tenant: str,
        namespace: str,
        users: tuple[str, str],
        now: datetime,
        *,
        with_metadata: bool,
    ) -> Vectors:
        """The live memories of ``namespace`` whose user is one of ``users``.

        The driver's rows go straight into the lists and the one bytes object (C-level
        ``itemgetter``, no row object of ours): for 10,000 of 384 dimensions the row
        objects and per-row Python took more than the read itself. (Packed by the
        server into one row, an array and one long value, they took four times as long
        on PostgreSQL: 65 against 15 ms.)"""
        params = {
            "tenant": tenant,
            "namespace": namespace,
            "user_a": users[0],
            "user_b": users[1],
            "now": now,
        }
        stmt = _CANDIDATES_WITH_METADATA if with_metadata else _CANDIDATES
        rows = await run_raw(conn, stmt, params)
        dimensions = set(map(_DIMS, rows))
        return Vectors(
            list(map(_ID, rows)),
            int(dimensions.pop()) if len(dimensions) == 1 else MIXED if dimensions else 0,
            b"".join(map(_VECTOR, rows)),
            list(map(_METADATA, rows)) if with_metadata else None,
        )

    async def accessed(
        self, conn: Connection, tenant: str, memory_ids: Sequence[str], now: datetime
    ) -> dict[str, MemoryRecord]:
        """Stamp ``last_accessed_at`` on the memories and return them, by id."""
        if not memory_ids:
            return {}
        stmt = (
            update(t)
            .where(c.tenant_id == tenant, c.memory_id.in_(list(memory_ids)))
            .values(last_accessed_at=now)
            .returning(*_RECORD)
        )
        return {row[0]: _record(row) for row in await conn.execute(stmt)}

    async def delete(self, conn: Connection, tenant: str, memory_id: str, now: datetime) -> bool:
        """Delete a live memory; whether there was one."""
        params = {"tenant": tenant, "id": memory_id, "now": now}
        return bool((await run(conn, _DELETE, params)).rowcount)

    async def count(
        self,
        conn: Connection,
        tenant: str,
        namespace: str,
        user_id: str,
        session_id: str | None,
        now: datetime,
    ) -> int:
        """Live memories of the namespace of ``user_id`` ("" = tenant-wide), those of one
        session of the user when ``session_id`` is given, else all of the user's."""
        where = [
            c.tenant_id == tenant,
            c.namespace == namespace,
            c.user_id == user_id,
            or_(c.expires_at.is_(None), c.expires_at > now),
        ]
        if session_id is not None:
            where.append(c.session_id == session_id)
        return int((await conn.execute(select(func.count()).where(*where))).scalar_one())


__all__ = ["MIXED", "SemanticMemoryRepository", "Vectors"]
