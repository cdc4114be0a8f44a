"""The LangGraph store (``ctxengine.integrations.langgraph.ContextEngineStore``) on
SPEC §13's memory tables: items as tenant-wide key-value memories, their indexed
texts as semantic memories (see :mod:`ctxengine.storage.repositories.graph_store`).

One unit of work per batch of writes (all of a batch's puts and deletes, or none);
reads in their own. Vectors are computed before a unit of work begins."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from ..storage.connection import Connection
from ..storage.repositories.graph_store import PAGE, GraphStoreRepository, StoredItem
from ..storage.repositories.memory import NO_SCOPE, MemoryRepository, MemoryScope
from ..storage.repositories.semantic_memory import SemanticMemoryRepository
from .base import Context, Effects
from .semantic_memory import best_matches

#: Where an item's vector ids begin (then a hash of its namespace and key).
_VECTOR_ID = "lgs."


class Write(NamedTuple):
    """One put (``value``) or delete (``value`` None) of an item. ``vectors``: the
    (field, text, unit vector) to index it by, None for none."""

    namespace: str
    key: str
    value: dict[str, Any] | None
    ttl: float | None
    vectors: list[tuple[str, str, np.ndarray[Any, Any]]] | None


def vector_ids(namespace: str, key: str, count: int) -> list[str]:
    """The ids of an item's ``count`` vectors (semantic memories)."""
    digest = hashlib.sha256(f"{namespace}\x00{key}".encode()).hexdigest()[:40]
    return [f"{_VECTOR_ID}{digest}.{i}" for i in range(count)]


def _levels(namespace: str) -> dict[str, str]:
    """``{"p1": first label, "p2": first two labels joined, ...}``: a vector's metadata
    keys a namespace prefix search filters on by equality."""
    labels = namespace.split(".")
    return {f"p{i}": ".".join(labels[:i]) for i in range(1, len(labels) + 1)}


class GraphStoreService:
    """Reads and writes of the LangGraph store; the store validates and maps."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.repo = GraphStoreRepository(ctx.store.backend)
        self.items = MemoryRepository(ctx.store.backend)
        self.vectors = SemanticMemoryRepository(ctx.store.backend)

    async def get(self, tenant: str, wanted: Sequence[tuple[str, str]]) -> list[StoredItem | None]:
        """The live items of (namespace, key) ``wanted``, in order (None: absent)."""

        async def work(conn: Connection, fx: Effects) -> list[StoredItem | None]:
            found: list[StoredItem | None] = []
            for namespace, key in wanted:
                where = MemoryScope(tenant, NO_SCOPE, NO_SCOPE, namespace)
                item = await self.items.get(conn, where, key, fx.now)
                found.append(
                    None
                    if item is None
                    else StoredItem(
                        namespace,
                        key,
                        item.value,
                        item.created_at,
                        item.updated_at,
                        item.expires_at,
                    )
                )
            return found

        return await self.ctx.transact(work, write=False, operation="langgraph_store_get")

    async def listing(
        self,
        tenant: str,
        prefix: str | None,
        limit: int,
        offset: int,
        keep: Callable[[Any], bool] | None,
    ) -> list[StoredItem]:
        """Live items in or under ``prefix``, most recently updated first, whose value
        ``keep`` accepts (None: all): ``limit`` of them after skipping ``offset``."""

        async def work(conn: Connection, fx: Effects) -> list[StoredItem]:
            if keep is None:
                return await self.repo.listing(conn, tenant, fx.now, prefix, limit, offset=offset)
            wanted = offset + limit
            kept: list[StoredItem] = []
            after: StoredItem | None = None
            while len(kept) < wanted:
                page = await self.repo.listing(conn, tenant, fx.now, prefix, PAGE, after=after)
                kept += [item for item in page if keep(item.value)]
                if len(page) < PAGE:
                    break
                after = page[-1]
            return kept[offset:wanted]

        return await self.ctx.transact(work, write=False, operation="langgraph_store_search")

    async def similar(
        self,
        tenant: str,
        space: str,
        prefix: str | None,
        query: np.ndarray[Any, Any],
        limit: int,
        offset: int,
        keep: Callable[[Any], bool] | None,
    ) -> list[tuple[StoredItem, float]]:
        """Live items in or under ``prefix`` with vectors in the semantic namespace
        ``space``, whose value ``keep`` accepts, best first by their best vector's
        cosine with ``query``: ``limit`` of them after skipping ``offset``."""
        wanted = offset + limit
        metadata = None if prefix is None else {f"p{prefix.count('.') + 1}": prefix}

        async def work(conn: Connection, fx: Effects) -> list[tuple[StoredItem, float]]:
            k = max(4 * wanted, 64)
            while True:
                found = await self.vectors.candidates(
                    conn,
                    tenant,
                    space,
                    (NO_SCOPE, NO_SCOPE),
                    fx.now,
                    query=query.tobytes(),
                    limit=k,
                    metadata=metadata,
                )
                ranked = best_matches(found, query, len(found.memory_ids), None, space)
                kept = await self._ranked_items(conn, tenant, fx.now, ranked, wanted, keep)
                if len(kept) >= wanted or len(found.memory_ids) < k:
                    return kept[offset:wanted]
                k *= 4  # an index gave the nearest k: too few passed

        return await self.ctx.transact(work, write=False, operation="langgraph_store_search")

    async def _ranked_items(
        self,
        conn: Connection,
        tenant: str,
        now: datetime,
        ranked: list[tuple[str, float]],
        wanted: int,
        keep: Callable[[Any], bool] | None,
    ) -> list[tuple[StoredItem, float]]:
        """The first ``wanted`` distinct live items ``keep`` accepts, of the vectors
        ``ranked`` (best first: an item's first vector is its best)."""
        kept: list[tuple[StoredItem, float]] = []
        seen: set[tuple[str, str]] = set()
        step = max(2 * wanted, 64)
        for start in range(0, len(ranked), step):
            chunk = ranked[start : start + step]
            owners = await self.repo.owners(conn, tenant, [i for i, _ in chunk])
            pairs = [owners[i] for i, _ in chunk if i in owners]
            items = await self.repo.items(conn, tenant, list(dict.fromkeys(pairs)), now)
            for memory_id, score in chunk:
                pair = owners.get(memory_id)
                if pair is None or pair in seen or pair not in items:
                    continue
                seen.add(pair)
                item = items[pair]
                if keep is None or keep(item.value):
                    kept.append((item, score))
                    if len(kept) == wanted:
                        return kept
        return kept

    async def namespaces(self, tenant: str, prefix: str | None) -> list[str]:
        """The namespaces holding live items, in or under ``prefix`` (None: all)."""

        async def work(conn: Connection, fx: Effects) -> list[str]:
            return await self.repo.namespaces(conn, tenant, fx.now, prefix)

        return await self.ctx.transact(
            work, write=False, operation="langgraph_store_list_namespaces"
        )

    async def refresh(self, tenant: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Start the TTL of each live item of ``pairs`` that has one over, from now
        (its ``ttl_seconds``), and its vectors' with it."""
        if not pairs:
            return

        async def work(conn: Connection, fx: Effects) -> None:
            # the items' rows first (one statement): their locks order this after, or
            # before, a put of the same item, which replaces its vectors
            refreshed = await self.repo.refresh(conn, tenant, pairs, fx.now)
            firsts = {vector_ids(ns, key, 1)[0]: (ns, key, when) for ns, key, when in refreshed}
            counts = await self.repo.vector_counts(conn, tenant, list(firsts))
            expiries: list[tuple[str, datetime]] = []
            for first, count in counts.items():
                namespace, key, when = firsts[first]
                expiries += [(i, when) for i in vector_ids(namespace, key, count)]
            await self.repo.expire_vectors(conn, tenant, expiries)

        await self.ctx.transact(work, operation="langgraph_store_refresh_ttl")

    async def write(self, tenant: str, writes: Sequence[Write], space: str | None) -> None:
        """Apply ``writes`` in order, all or none; vectors go to the semantic
        namespace ``space``."""
        if not writes:
            return

        async def work(conn: Connection, fx: Effects) -> None:
            for write in writes:
                await self._write(conn, fx.now, tenant, write, space)

        await self.ctx.transact(work, operation="langgraph_store_put")

    async def _write(
        self, conn: Connection, now: datetime, tenant: str, write: Write, space: str | None
    ) -> None:
        namespace, key = write.namespace, write.key
        item = MemoryScope(tenant, NO_SCOPE, NO_SCOPE, namespace)
        expires = None
        if write.value is None:
            await self.items.forget(conn, item, key, now)
        else:
            # the item's row first: its lock orders concurrent writers of the item
            written = await self.items.put(conn, item, key, write.value, now, write.ttl, None)
            assert written is not None  # an unconditional put always writes
            expires = written.expires_at
        (first,) = vector_ids(namespace, key, 1)
        old = await self.repo.vector_count(conn, tenant, first)
        await self.repo.delete_vectors(conn, tenant, vector_ids(namespace, key, old))
        vectors = write.vectors or []
        if write.value is not None and vectors and space is not None:
            ids = vector_ids(namespace, key, len(vectors))
            levels = _levels(namespace)
            for memory_id, (field, text, vector) in zip(ids, vectors, strict=True):
                row = {
                    "tenant_id": tenant,
                    "memory_id": memory_id,
                    "user_id": NO_SCOPE,
                    "session_id": NO_SCOPE,
                    "namespace": space,
                    "text": text,
                    "metadata": {
                        "namespace": namespace,
                        "key": key,
                        "field": field,
                        "count": len(vectors),
                        **levels,
                    },
                    "importance": 1.0,
                    "dimensions": len(vector),
                    "embedding": vector.tobytes(),
                    "source": f"langgraph-store/{memory_id}",
                    "created_at": now,
                    "last_accessed_at": now,
                    "expires_at": expires,
                }
                await self.vectors.insert(conn, row)


__all__ = ["GraphStoreService", "Write", "vector_ids"]
