"""Semantic memory (SPEC §13): memories and their vectors. A search's candidates are
read here (every vector of the scope, or the nearest ones where the database finds
them: sqlite-vec, pgvector's HNSW); the service compares them with the query."""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple

from sqlalchemy import (
    REAL,
    Column,
    ColumnElement,
    Float,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    column,
    delete,
    func,
    literal,
    literal_column,
    not_,
    or_,
    select,
    true,
    type_coerce,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import UserDefinedType

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
RECORD_COLUMNS = (
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
_BY_SOURCE = select(*RECORD_COLUMNS).where(
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
#: sqlite-vec: a stored vector's cosine distance to the query ([0, 2]), -1 for one of
#: another length (sorted first: a namespace of mixed dimensions is noticed).
_BLOB_DISTANCE = case(
    (
        c.dimensions == bindparam("dims"),
        func.vec_distance_cosine(c.embedding, bindparam("query", type_=LargeBinary()), type_=Float),
    ),
    else_=literal(-1.0),
)
_ROWID: ColumnElement[int] = literal_column("rowid")
#: The ``k`` nearest by sqlite-vec (LIMIT -1: all, nearest first), then their rows: the
#: sort holds row ids, not vectors (a sort of the rows themselves copied every vector
#: of the scope once more).
_NEAREST_ROWS = _ROWID.in_(
    select(_ROWID)
    .select_from(t)
    .where(_IN_NAMESPACE, _OF_USERS, _ALIVE)
    .order_by(_BLOB_DISTANCE)
    .limit(bindparam("k"))
    .correlate(None)
    .scalar_subquery()
)
_NEAREST_BY_BLOB = select(c.memory_id, c.dimensions, c.embedding).where(_NEAREST_ROWS)
_NEAREST_BY_BLOB_WITH_METADATA = select(c.memory_id, c.dimensions, c.embedding, c.metadata).where(
    _NEAREST_ROWS
)
#: pgvector's HNSW: candidates examined per search (``hnsw.ef_search``, at least the
#: limit). 100 gave recall@10 0.95-0.96 among 100,000 vectors of 384 dimensions shaped
#: like a text model's (benchmarks/memory.py), 40 gave 0.90 among 20,000.
EF_SEARCH = 100
#: A filtered metadata search on SQLite first reads this many nearest per hit wanted.
_WINDOW = 8
#: A live memory (an expired one is absent, as to every call; the sweep deletes it).
_DELETE = delete(t).where(
    c.tenant_id == bindparam("tenant"), c.memory_id == bindparam("id"), _ALIVE
)


#: ``Vectors.dimensions`` of memories whose vectors differ in length (two first writes
#: of a namespace with different dimensions, at once: nothing serializes them).
MIXED = -1


class _Vector(UserDefinedType[Any]):
    """pgvector's ``vector(dims)`` (as the HNSW index expressions cast the column)."""

    cache_ok = True

    def __init__(self, dims: int) -> None:
        self.dims = dims

    def get_col_spec(self, **_: Any) -> str:
        return f"vector({self.dims})"


def _constant(value: str) -> Any:
    """``value`` as a PostgreSQL string constant, escaped for either setting of
    ``standard_conforming_strings``."""
    return literal_column("E'" + value.replace("\\", "\\\\").replace("'", "''") + "'")


def _by_index(dims: int, keys: tuple[str, ...], scope: tuple[str, str, str, str], k: int) -> Any:
    """The ``k`` nearest live memories of ``scope`` (tenant, namespace, two users) by
    pgvector's HNSW index of ``dims`` (``ix_ctx_memories_hnsw_<dims>``: ``USING hnsw
    ((embedding_vector::vector(dims)) vector_cosine_ops) WHERE dimensions = dims``),
    whose metadata has the JSON value ``value<i>`` at each key ``keys[i]``.

    The scope, the limit and the dimension are written into the SQL (a prepared
    statement's generic plan, guessing at the scope's size, could sort every vector
    of a large scope instead of using the index); the index settings are set by a
    subquery the scan depends on, so they hold for this statement only, in
    autocommit too: ``hnsw.ef_search`` and pgvector 0.8's iterative scan, which
    keeps scanning until the scope and metadata filters pass ``k`` rows."""
    vector = _Vector(dims)
    distance = cast(column("embedding_vector"), vector).op("<=>")(
        cast(bindparam("query", type_=ARRAY(REAL())), vector)
    )
    ready = select(
        func.concat(
            func.set_config("hnsw.ef_search", bindparam("ef"), true()),
            func.set_config("hnsw.iterative_scan", "relaxed_order", true()),
        ).label("ready")
    ).subquery("settings")
    tenant, namespace, user_a, user_b = scope
    where = [
        c.tenant_id == _constant(tenant),
        c.namespace == _constant(namespace),
        c.user_id.in_([_constant(user_a), _constant(user_b)]),
        c.dimensions == literal_column(str(int(dims))),
        _ALIVE,
        ready.c.ready.is_not(None),
    ]
    for i, key in enumerate(keys):
        pair = c.metadata.op("->", return_type=JSONB)(literal(key, String))
        where.append(pair == cast(bindparam(f"value{i}", type_=String), JSONB))
    nearest = (
        select(c.memory_id, c.dimensions, c.embedding, c.metadata)
        .where(*where)
        .order_by(distance)
        .limit(literal_column(str(int(k))))
        .lateral("nearest")
    )
    n = nearest.c
    return select(n.memory_id, n.dimensions, n.embedding, n.metadata).select_from(
        ready.join(nearest, true())
    )


#: The statements of ``accessed``, by the number of ids they take.
_ACCESSED: dict[int, Any] = {}
#: The statements of :func:`_by_index`, by their arguments (the most recently used).
_BY_INDEX: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


class _AnyVector(UserDefinedType[Any]):
    """pgvector's ``vector`` of any dimension, bound as ``real[]`` (a list of numbers)."""

    cache_ok = True

    def get_col_spec(self, **_: Any) -> str:
        return "vector"

    def bind_expression(self, bindvalue: Any) -> Any:
        return cast(type_coerce(bindvalue, ARRAY(REAL())), self)


#: ctx_memories with pgvector's copy of each vector (migration 0011, where the server
#: has pgvector), for inserts: not in the schema alembic compares, since a database
#: without pgvector has no such column.
_WITH_VECTOR = Table(
    "ctx_memories",
    MetaData(),
    *(column._copy() for column in t.columns),
    Column("embedding_vector", _AnyVector(), nullable=True),
)


class Vectors(NamedTuple):
    """The live memories a search compares: their ids, the dimension of their vectors,
    the vectors one after another (little-endian float32s) and, when the search
    filters on it, each one's metadata."""

    memory_ids: list[str]
    dimensions: int
    data: bytes
    metadata: list[dict[str, Any]] | None


def record_of(row: Record) -> MemoryRecord:
    """The MemoryRecord of a row of :data:`RECORD_COLUMNS`."""
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


def _vectors(rows: Sequence[Any], dimensions: int) -> Vectors:
    """Vectors of candidate rows (memory_id, …, embedding, metadata when read)."""
    return Vectors(
        list(map(_ID, rows)),
        dimensions,
        b"".join(map(_VECTOR, rows)),
        list(map(_METADATA, rows)) if rows and len(rows[0]) > 3 else None,
    )


def _holds(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether ``stored`` metadata has every pair of ``wanted``, as JSON."""
    return all(key in stored and _same_json(stored[key], value) for key, value in wanted.items())


def _same_json(stored: Any, wanted: Any) -> bool:
    """Whether two JSON values are equal as JSON: true is not 1 (Python's == says it
    is), 1 is 1.0; objects and arrays compared member by member (as jsonb's =)."""
    if isinstance(stored, bool) or isinstance(wanted, bool):
        return type(stored) is type(wanted) and stored == wanted
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return stored.keys() == wanted.keys() and all(
            _same_json(stored[key], wanted[key]) for key in stored
        )
    if isinstance(stored, list) and isinstance(wanted, list):
        return len(stored) == len(wanted) and all(
            _same_json(a, b) for a, b in zip(stored, wanted, strict=True)
        )
    if isinstance(stored, dict | list) or isinstance(wanted, dict | list):
        return False
    return bool(stored == wanted)


def _inserts(backend: Backend, table: Table) -> tuple[Any, Any]:
    """Insert a memory (every column of ``table``); one whose source a live memory has
    already writes nothing (an expired one with that source is replaced: expired
    memories are absent). And the same, only into a namespace whose vectors have the
    memory's dimension."""
    names = [column.key for column in table.columns]

    def replaced(excluded: Any) -> dict[str, Any]:
        return {name: excluded[name] for name in names if name not in ("tenant_id", "source")}

    values = {name: bindparam(name, type_=table.c[name].type) for name in names}
    insert = backend.upsert(
        table, ["tenant_id", "source"], values, replaced, where=lambda excluded: not_(_ALIVE)
    )
    settled = (
        select(c.dimensions)
        .where(c.tenant_id == values["tenant_id"], c.namespace == values["namespace"])
        .limit(1)
        .scalar_subquery()
    )
    fitting = select(*(value.label(name) for name, value in values.items())).where(
        settled == values["dimensions"]
    )
    insert_fitting = backend.upsert(
        table, ["tenant_id", "source"], fitting, replaced, where=lambda excluded: not_(_ALIVE)
    )
    return insert, insert_fitting


def _floats(vector: bytes) -> list[float]:
    """Little-endian float32s as numbers (for pgvector's copy, sent as ``real[]``)."""
    return list(struct.unpack(f"<{len(vector) // 4}f", vector))


class SemanticMemoryRepository(MemoryTable):
    """The statements of semantic memory."""

    table = memories

    async def dimensions(self, conn: Connection, tenant: str, namespace: str) -> int | None:
        """The dimension of the vectors stored in the namespace; None when it holds none."""
        found = (await run(conn, _DIMENSIONS, {"tenant": tenant, "namespace": namespace})).first()
        return None if found is None else int(found[0])

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        self._insert, self._insert_fitting = _inserts(backend, t)
        #: The same two, writing pgvector's copy of the vector as well (where the
        #: database has the column: no decoding by its trigger, 0.35 ms an add).
        self._insert_vector, self._insert_fitting_vector = _inserts(backend, _WITH_VECTOR)
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

    async def insert(
        self, conn: Connection, row: dict[str, Any], *, settled: bool = False
    ) -> MemoryRecord | None:
        """Insert the memory of ``row`` (every column) and return it; None when a live
        memory of the tenant has its ``source``, or with ``settled`` when the namespace
        holds no vectors of the row's dimension yet (nothing is written)."""
        params = dict(row, now=row["created_at"])
        if (await self.backend.vector_search(conn)).vector_column:
            stmt = self._insert_fitting_vector if settled else self._insert_vector
            params["embedding_vector"] = _floats(row["embedding"])
        else:
            stmt = self._insert_fitting if settled else self._insert
        if not (await run(conn, stmt, params)).rowcount:
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
        return None if found is None else record_of(found)

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
        query: bytes,
        limit: int,
        metadata: Mapping[str, Any] | None,
    ) -> Vectors:
        """The memories a search compares with ``query`` (little-endian float32s): the
        live ones of ``namespace`` whose user is one of ``users`` and whose metadata
        holds every pair of ``metadata`` (as JSON: true is not 1). Where the database
        finds the nearest itself (sqlite-vec, pgvector's HNSW index for the query's
        dimension), those: the ``limit`` nearest, or the scope's whole when smaller;
        else every one of them."""
        params: dict[str, Any] = {
            "tenant": tenant,
            "namespace": namespace,
            "user_a": users[0],
            "user_b": users[1],
            "now": now,
        }
        dims = len(query) // 4
        found = None
        offered = await self.backend.vector_search(conn)
        if offered.blob_distance:
            found = await self._nearest_by_blob(conn, params, query, limit, metadata)
        elif dims in offered.indexed:
            found = await self._nearest_by_index(conn, params, query, limit, metadata)
        if found is not None:
            return found
        return await self._every(conn, params, metadata)

    async def _every(
        self, conn: Connection, params: dict[str, Any], metadata: Mapping[str, Any] | None
    ) -> Vectors:
        """Every candidate of the scope, for an exact search.

        The driver's rows go straight into the lists and the one bytes object (C-level
        ``itemgetter``, no row object of ours): for 10,000 of 384 dimensions the row
        objects and per-row Python took more than the read itself. (Packed by the
        server into one row, an array and one long value, they took four times as long
        on PostgreSQL: 65 against 15 ms.)"""
        stmt = _CANDIDATES_WITH_METADATA if metadata else _CANDIDATES
        rows = await run_raw(conn, stmt, params)
        if metadata:
            rows = [row for row in rows if _holds(row[3], metadata)]
        dimensions = set(map(_DIMS, rows))
        return _vectors(
            rows, int(dimensions.pop()) if len(dimensions) == 1 else MIXED if dimensions else 0
        )

    async def _nearest_by_blob(
        self,
        conn: Connection,
        params: dict[str, Any],
        query: bytes,
        limit: int,
        metadata: Mapping[str, Any] | None,
    ) -> Vectors | None:
        """The nearest by sqlite-vec's cosine distance over the stored blobs, computed
        and sorted in SQL (exact: every vector of the scope is compared); None when
        the scope holds a vector of another length than the query's (the exact
        search says what is wrong). With a metadata filter, the ``_WINDOW`` times
        ``limit`` nearest are filtered first, then, if too few pass, all of them."""
        dims = len(query) // 4
        params = dict(params, query=query, dims=dims, k=limit)
        if not metadata:
            rows = await run_raw(conn, _NEAREST_BY_BLOB, params)
        else:  # the nearest passing the filter are among a window holding enough of them
            window = max(limit * _WINDOW, 64)
            rows = await run_raw(conn, _NEAREST_BY_BLOB_WITH_METADATA, dict(params, k=window))
            if len(rows) == window and sum(_holds(r[3], metadata) for r in rows) < limit:
                params["k"] = -1  # no limit
                rows = await run_raw(conn, _NEAREST_BY_BLOB_WITH_METADATA, params)
            rows = [row for row in rows if _holds(row[3], metadata)]
        if any(row[1] != dims for row in rows):  # sorted first: in the k when there
            return None
        return _vectors(rows, dims)

    async def _nearest_by_index(
        self,
        conn: Connection,
        params: dict[str, Any],
        query: bytes,
        limit: int,
        metadata: Mapping[str, Any] | None,
    ) -> Vectors | None:
        """The nearest by pgvector's HNSW index (approximate: recall@10 0.95 or more
        at ``EF_SEARCH``), filters applied during the scan; None when it finds fewer
        than ``limit`` (a scope that small, a filter passing few, vectors of another
        length than the query's: the exact search is cheap then, and right)."""
        dims = len(query) // 4
        keys = tuple(sorted(metadata or ()))
        scope = (params["tenant"], params["namespace"], params["user_a"], params["user_b"])
        key = (dims, keys, scope, limit)
        stmt = _BY_INDEX.get(key)
        if stmt is None:
            stmt = _BY_INDEX[key] = _by_index(dims, keys, scope, limit)
            if len(_BY_INDEX) > 512:
                _BY_INDEX.popitem(last=False)
        else:
            _BY_INDEX.move_to_end(key)
        values = {
            "now": params["now"],
            "query": list(struct.unpack(f"<{dims}f", query)),
            "ef": str(max(EF_SEARCH, limit)),
        }
        for i, name in enumerate(keys):
            assert metadata is not None
            values[f"value{i}"] = json.dumps(metadata[name])
        rows = await run_raw(conn, stmt, values)
        if metadata:
            rows = [row for row in rows if _holds(row[3], metadata)]
        if len(rows) < limit:
            return None
        return _vectors(rows, dims)

    async def accessed(
        self, conn: Connection, tenant: str, memory_ids: Sequence[str], now: datetime
    ) -> dict[str, MemoryRecord]:
        """Stamp ``last_accessed_at`` on the memories and return them, by id.

        One statement built once per power of two of ids (the list padded with its
        last id), run on the driver directly: through SQLAlchemy, a statement built
        per call cost a search about 0.7 ms of CPU."""
        if not memory_ids:
            return {}
        size = 1 << (len(memory_ids) - 1).bit_length()
        stmt = _ACCESSED.get(size)
        if stmt is None:
            ids = [bindparam(f"id{i}", type_=String()) for i in range(size)]
            stmt = _ACCESSED[size] = (
                update(t)
                .where(c.tenant_id == bindparam("tenant"), c.memory_id.in_(ids))
                .values(last_accessed_at=_NOW)
                .returning(*RECORD_COLUMNS)
            )
        params: dict[str, Any] = {"tenant": tenant, "now": now}
        for i in range(size):
            params[f"id{i}"] = memory_ids[min(i, len(memory_ids) - 1)]
        return {row[0]: record_of(row) for row in await run(conn, stmt, params)}

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


__all__ = ["MIXED", "RECORD_COLUMNS", "SemanticMemoryRepository", "Vectors", "record_of"]
