"""Semantic memory (SPEC §13): texts stored with their vectors, found by meaning.

Texts are embedded before the unit of work begins (an embedder may take a while).
A search compares the query's vector with its candidates in one matrix product: the
scope's every vector (exact: 10,000 of 384 dimensions in 24-40 ms), or the nearest
an index found (sqlite-vec, pgvector's HNSW: the repository decides, from what the
database offers), scored the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from .. import validation as v
from ..embeddings import Embedder, checked_vectors
from ..errors import SessionNotFoundError, ValidationError
from ..ids import new_id
from ..models import MemoryHit, MemoryRecord
from ..storage.connection import Connection
from ..storage.repositories.memory import NO_SCOPE, MemoryScope
from ..storage.repositories.semantic_memory import MIXED, SemanticMemoryRepository, Vectors
from .base import Context, Effects
from .conversation import ConversationService
from .sessions import SessionService

#: The longest source, in bytes of UTF-8.
MAX_SOURCE_BYTES = 2048
#: How many messages memorize_session embeds at once.
MEMORIZE_BATCH = 64
#: The most hits one search returns.
MAX_HITS = 1000
#: How far below ``min_score`` a cosine computed in float32 may fall and still count.
_SLACK = 1e-6


class SemanticMemoryService:
    """add_memory / search_memory / delete_memory / count_memories / memorize_session."""

    def __init__(
        self, ctx: Context, sessions: SessionService, conversation: ConversationService
    ) -> None:
        self.ctx = ctx
        self.sessions = sessions
        self.conversation = conversation
        self.repo = SemanticMemoryRepository(ctx.store.backend)

    @property
    def _embedder(self) -> Embedder | None:
        return self.ctx.settings.embedder

    async def add(
        self,
        where: MemoryScope,
        text: object,
        metadata: object,
        ttl: object,
        importance: object,
        embedding: object,
        source: object = None,
    ) -> MemoryRecord:
        body = _text(text, "text", self.ctx.settings.max_message_bytes)
        meta = v.json_object(metadata, "metadata", self.ctx.settings.max_metadata_bytes)
        weight = _importance(importance)
        seconds = None if ttl is None else v.seconds(ttl, "ttl")
        origin = None if source is None else _text(source, "source", MAX_SOURCE_BYTES)
        if origin is not None:  # stored already: nothing to embed
            found = await self._by_source(where.tenant_id, origin)
            if found is not None:
                return found
        vector = await self._vector(body, embedding)
        row = _row(where, body, meta, weight, seconds, vector, origin)

        if self.ctx.settings.max_memories_per_user is None or where.user_id == NO_SCOPE:
            # one statement where it is all there is to do: a namespace settled to this
            # dimension, a source (if any) not stored, no cap to apply
            async def at_once(conn: Connection, fx: Effects) -> MemoryRecord | None:
                record = await self.repo.insert(conn, _stamped(row, fx.now), settled=True)
                if record is not None:
                    _added(fx, where.tenant_id, record)
                return record

            added = await self.ctx.transact(at_once, one_statement=True, operation="add_memory")
            if added is not None:
                return added

        async def work(conn: Connection, fx: Effects) -> MemoryRecord:
            (record,) = await self._insert(conn, fx, where, [row])
            return record

        return await self.ctx.transact(work, operation="add_memory")

    async def _by_source(self, tenant: str, source: str) -> MemoryRecord | None:
        async def work(conn: Connection, fx: Effects) -> MemoryRecord | None:
            return await self.repo.by_source(conn, tenant, source, fx.now)

        return await self.ctx.transact(work, write=False, operation="add_memory")

    async def _insert(
        self, conn: Connection, fx: Effects, where: MemoryScope, rows: list[dict[str, Any]]
    ) -> list[MemoryRecord]:
        """Insert memories of one scope (rows of :func:`_row`, stamped now): each one
        whose source a live memory has already is that memory instead, and nothing is
        written for it. Then the user's memories beyond ``max_memories_per_user`` go."""
        tenant, namespace = where.tenant_id, where.namespace
        keep = self.ctx.settings.max_memories_per_user
        if keep is not None and where.user_id != NO_SCOPE:
            # one writer per user at a time while the cap applies: exact across processes
            await self.ctx.store.backend.lock(conn, user_lock(tenant, where.user_id))
        stored = await self.repo.dimensions(conn, tenant, namespace)
        if stored is None:
            # the namespace's first vectors: one writer at a time settles its dimension
            await self.ctx.store.backend.lock(conn, namespace_lock(tenant, namespace))
            stored = await self.repo.dimensions(conn, tenant, namespace)
        records = []
        for new in rows:
            _same_dimensions(stored, new["dimensions"], namespace)
            stored = new["dimensions"]
            record = await self.repo.insert(conn, _stamped(new, fx.now))
            if record is None:
                found = await self.repo.by_source(conn, tenant, new["source"], fx.now)
                assert found is not None  # the conflicting row is locked by the insert
                records.append(found)
                continue
            _added(fx, tenant, record)
            records.append(record)
        if keep is not None and where.user_id != NO_SCOPE:
            for memory_id in await self.repo.evict(conn, tenant, where.user_id, keep, fx.now):
                fx.emit("memory.deleted", tenant, memory_id=memory_id, reason="evicted")
        return records

    async def search(
        self,
        tenant: str,
        user_id: object,
        namespace: object,
        query: object,
        limit: object,
        min_score: object,
        metadata: object,
        include_shared: bool,
    ) -> list[MemoryHit]:
        user = v.optional_identifier(user_id, "user_id")
        space = v.identifier(namespace, "namespace")
        wanted = _text(query, "query", self.ctx.settings.max_message_bytes)
        size = v.limit(limit)
        if size > MAX_HITS:
            raise ValidationError(f"limit must be at most {MAX_HITS}, got {size}", field="limit")
        floor = _min_score(min_score)
        match = v.json_object(metadata, "metadata", self.ctx.settings.max_metadata_bytes)
        query_vector = await self._vector(wanted, None)
        if user is None:
            users = (NO_SCOPE, NO_SCOPE)
        else:
            users = (user, NO_SCOPE if include_shared else user)

        async def work(conn: Connection, fx: Effects) -> list[MemoryHit]:
            found = await self.repo.candidates(
                conn,
                tenant,
                space,
                users,
                fx.now,
                query=query_vector.tobytes(),
                limit=size,
                metadata=match or None,
            )
            best = best_matches(found, query_vector, size, floor, space)
            records = await self.repo.accessed(conn, tenant, [i for i, _ in best], fx.now)
            return [MemoryHit(record=records[i], score=s) for i, s in best if i in records]

        # one write, the stamp of the hits (a hit deleted meanwhile is left out): no
        # transaction to begin and commit on PostgreSQL
        return await self.ctx.transact(work, one_statement=True, operation="search_memory")

    async def delete(self, tenant: str, memory_id: object) -> bool:
        target = v.identifier(memory_id, "memory_id")

        async def work(conn: Connection, fx: Effects) -> bool:
            deleted = await self.repo.delete(conn, tenant, target, fx.now)
            if deleted:
                fx.emit("memory.deleted", tenant, memory_id=target)
            return deleted

        return await self.ctx.transact(work, one_statement=True, operation="delete_memory")

    async def count(self, where: MemoryScope, *, all_sessions: bool) -> int:
        session = None if all_sessions else where.session_id

        async def work(conn: Connection, fx: Effects) -> int:
            return await self.repo.count(
                conn, where.tenant_id, where.namespace, where.user_id, session, fx.now
            )

        return await self.ctx.transact(work, write=False, operation="count_memories")

    async def memorize(
        self, tenant: str, session_id: object, chat_id: object, namespace: object
    ) -> list[MemoryRecord]:
        space = v.identifier(namespace, "namespace")
        sid = v.identifier(session_id)
        session = await self.sessions.get(tenant, sid)
        if session is None:
            raise SessionNotFoundError(sid, tenant)
        if chat_id is None:
            chats = [chat.chat_id for chat in await self.conversation.list_chats(tenant, sid)]
        else:
            chats = [v.identifier(chat_id, "chat_id")]
        messages = [
            message
            for chat in chats
            for message in await self.conversation.get_messages(
                tenant, sid, chat, None, None, include_compacted=True
            )
            if message.role != "system"
        ]
        texts = {f"message/{m.message_id}": (m, _message_text(m.content)) for m in messages}
        texts = {source: (m, text) for source, (m, text) in texts.items() if text}
        where = MemoryScope(tenant, session.user_id, NO_SCOPE, space)

        async def stored(conn: Connection, fx: Effects) -> set[str]:
            return await self.repo.sources(conn, tenant, list(texts), fx.now)

        known = await self.ctx.transact(stored, write=False, operation="memorize_session")
        new = [source for source in texts if source not in known]
        memorized: list[MemoryRecord] = []
        for start in range(0, len(new), MEMORIZE_BATCH):
            batch = new[start : start + MEMORIZE_BATCH]
            vectors = await self._embed([texts[source][1] for source in batch])
            rows = []
            for source, vector in zip(batch, vectors, strict=True):
                message, text = texts[source]
                metadata = {
                    "source_session": sid,
                    "chat_id": message.chat_id,
                    "seq": message.seq,
                    "role": message.role,
                }
                rows.append(_row(where, text, metadata, 1.0, None, vector, source))

            async def work(
                conn: Connection, fx: Effects, rows: list[dict[str, Any]] = rows
            ) -> list[MemoryRecord]:
                records = await self._insert(conn, fx, where, rows)
                return [
                    r
                    for r, row in zip(records, rows, strict=True)
                    if r.memory_id == row["memory_id"]
                ]

            memorized += await self.ctx.transact(work, operation="memorize_session")
        return memorized

    async def _vector(self, text: str, embedding: object) -> np.ndarray[Any, Any]:
        """``embedding`` (checked) or the embedder's vector of ``text``, scaled to
        length 1, as little-endian float32s."""
        if embedding is None:
            (vector,) = await self._embed([text])
            return vector
        if isinstance(embedding, str | bytes | Mapping) or not hasattr(embedding, "__iter__"):
            raise ValidationError("embedding must be a sequence of numbers", field="embedding")
        try:
            given = [float(x) for x in embedding]
        except (TypeError, ValueError):
            raise ValidationError(
                "embedding must be a sequence of numbers", field="embedding"
            ) from None
        embedder = self._embedder
        dimensions = len(given) if embedder is None else embedder.dimensions
        (values,) = checked_vectors([given], 1, dimensions, source="caller")
        return unit_vector(values)

    async def _embed(self, texts: list[str]) -> list[np.ndarray[Any, Any]]:
        """The embedder's vectors of ``texts`` (checked), as :meth:`_vector`'s."""
        embedder = self._embedder
        if embedder is None:
            raise ValidationError(
                "semantic memory needs an embedder: set EngineSettings.embedder "
                "(ctxengine.embeddings), or pass embedding=",
                field="embedder",
            )
        vectors = await embedder.embed(texts)
        checked = checked_vectors(vectors, len(texts), embedder.dimensions, source="embedder")
        return [unit_vector(values) for values in checked]


def unit_vector(values: list[float]) -> np.ndarray[Any, Any]:
    """``values`` scaled to length 1, as little-endian float32s."""
    vector = np.asarray(values, dtype="<f4")
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValidationError("an embedding of length 0 has no direction", field="embedding")
    return (vector / norm).astype("<f4")


def _message_text(content: str) -> str:
    """What a message says: its text, or for JSON data (an agent framework's item) the
    text inside it (``content``/``text`` strings); "" when it holds none."""
    if not content.startswith(("{", "[")):
        return content.strip()
    try:  # text that only looks like JSON, or nests too deep to walk, is text
        return "\n".join(_texts_in(json.loads(content))).strip()
    except (ValueError, RecursionError):
        return content.strip()


def _texts_in(data: Any) -> list[str]:
    if isinstance(data, list):
        return [text for part in data for text in _texts_in(part)]
    if not isinstance(data, dict):
        return []
    found = []
    for key in ("content", "text"):
        value = data.get(key)
        if isinstance(value, str):
            found.append(value)
        elif isinstance(value, list | dict):
            found += _texts_in(value)
    return found


def user_lock(tenant: str, user_id: str) -> str:
    """The lock a write of the user's memories takes while ``max_memories_per_user``
    applies (and an import always): one such writer per user at a time. Taken before
    :func:`namespace_lock`."""
    return f"ctxengine.memory-user.{tenant}/{user_id}"


def namespace_lock(tenant: str, namespace: str) -> str:
    """The lock the first write of a namespace takes while it settles the dimension."""
    return f"ctxengine.memory-space.{tenant}/{namespace}"


def _row(
    where: MemoryScope,
    text: str,
    metadata: dict[str, Any],
    importance: float,
    ttl: float | None,
    vector: np.ndarray[Any, Any],
    source: str | None,
) -> dict[str, Any]:
    """The columns of a new memory but its times, and its ``ttl``."""
    return {
        "tenant_id": where.tenant_id,
        "memory_id": new_id(),
        "user_id": where.user_id,
        "session_id": where.session_id,
        "namespace": where.namespace,
        "text": text,
        "metadata": metadata,
        "importance": importance,
        "dimensions": len(vector),
        "embedding": vector.tobytes(),
        "source": source,
        "ttl": ttl,
    }


def _stamped(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A row of :func:`_row` with its times, as of ``now``."""
    ttl = row["ttl"]
    expires_at = None if ttl is None else now + timedelta(seconds=ttl)
    return dict(row, created_at=now, last_accessed_at=now, expires_at=expires_at)


def _added(fx: Effects, tenant: str, record: MemoryRecord) -> None:
    fx.emit(
        "memory.added",
        tenant,
        record.session_id,
        record.user_id,
        memory_id=record.memory_id,
        namespace=record.namespace,
    )


def _text(value: object, field: str, max_bytes: int) -> str:
    body = v.text(value, field, max_bytes)
    if not body.strip():
        raise ValidationError(f"{field} must not be empty", field=field)
    return body


def _importance(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(
            f"importance must be a finite number, got {value!r}", field="importance"
        )
    if value < 0:
        raise ValidationError(f"importance must be >= 0, got {value!r}", field="importance")
    return float(value)


def _min_score(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
        raise ValidationError(
            f"min_score must be a number from -1 to 1 (a cosine), got {value!r}",
            field="min_score",
        )
    return float(value)


def _same_dimensions(stored: int | None, given: int, namespace: str) -> None:
    if stored is not None and stored != given:
        raise ValidationError(
            f"namespace {namespace!r} holds vectors of {stored} dimensions; this one has "
            f"{given} (one embedder per namespace)",
            field="embedding",
        )


def best_matches(
    found: Vectors,
    query: np.ndarray[Any, Any],
    limit: int,
    floor: float | None,
    namespace: str,
) -> list[tuple[str, float]]:
    """The ``limit`` highest cosines of ``found`` to ``query`` (at least ``floor``),
    best first: one matrix product over the scope's vectors."""
    count = len(found.memory_ids)
    if not count:
        return []
    if found.dimensions == MIXED:
        raise ValidationError(
            f"namespace {namespace!r} holds vectors of several dimensions (written at once "
            "by different embedders): delete the memories of the other embedder",
            field="namespace",
        )
    _same_dimensions(found.dimensions, len(query), namespace)
    matrix = np.frombuffer(found.data, dtype="<f4").reshape(count, len(query))
    # each row's sum of products on its own (einsum), so a memory's score is the same
    # whichever candidates it is read with (BLAS's product blocks rows together and
    # rounds a row differently by its place); float32 rounding can put a vector's
    # cosine with itself a hair above 1
    scores = np.clip(np.einsum("ij,j->i", matrix, query), -1.0, 1.0)
    if limit < count:
        top = np.argpartition(-scores, limit - 1)[:limit]
    else:
        top = np.arange(count)
    ordered = top[np.argsort(-scores[top], kind="stable")]
    best = [(found.memory_ids[i], float(scores[i])) for i in ordered]
    if floor is not None:  # within float32's precision: a duplicate meets min_score=1
        best = [(memory_id, score) for memory_id, score in best if score >= floor - _SLACK]
    return best
