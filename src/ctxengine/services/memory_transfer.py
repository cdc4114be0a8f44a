"""Export and import of a user's memories (SPEC §13), and the overview the command line
prints.

The document, ``format_version`` 1 (JSON-safe: datetimes as ISO 8601 strings)::

    {"format": "ctxengine.memories", "format_version": 1, "exported_at": "...",
     "user_id": "ann" | null, "namespace": "default" | null,
     "items": [{"key", "value", "version", "session_id", "namespace",
                "created_at", "updated_at", "expires_at"}, ...],
     "memories": [{"memory_id", "text", "metadata", "importance", "session_id",
                   "namespace", "created_at", "last_accessed_at", "expires_at",
                   "source", "dimensions", "embedding"}, ...]}

``embedding`` is the base64 of the vector's ``dimensions`` little-endian float32s, as
stored (length 1): an import puts back the same bits. Only live memories are
exported: the user's (``null``: the tenant-wide scope's), those narrowed to their
sessions included, of one namespace or (``namespace`` null) all.

Importing is idempotent. A key-value item is written unless a live item with the same
value and expiry is stored under its key: where nothing live is stored, the exported
item comes back as it was (value, version, timestamps); a live item that differs is
overwritten as ``remember`` would (one version more, updated now). A semantic memory
is added unless it is present: the tenant holds a live memory with its id, or a live
memory of the same user with its source. Under another user than the export's, the
memories get ids of their own (the same each time for one user) and a source that a
memory of another user holds already stays with that memory (the copy has none: a
tenant holds one memory per source). Entries that have expired by the import are
not written.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PositiveInt, StringConstraints

from .. import validation as v
from ..errors import ValidationError
from ..models import MemoryImportResult, MemoryItem, MemoryRecord
from ..storage.connection import Connection
from ..storage.repositories.memory import NO_SCOPE
from ..storage.repositories.memory_transfer import MemoryTransferRepository
from ..storage.repositories.semantic_memory import SemanticMemoryRepository
from .base import Context, Effects
from .memory import memory_value
from .memory import scope as memory_scope
from .semantic_memory import MAX_SOURCE_BYTES, namespace_lock, user_lock

FORMAT = "ctxengine.memories"
FORMAT_VERSION = 1
#: How far from 1 the length of an imported vector may be (float32 rounding of a unit
#: vector stays far within it); anything else was not written by ctxengine.
_UNIT_SLACK = 1e-3
#: The ids of memories copied to another user: uuid5 of the user and the original id.
_COPY_IDS = uuid.UUID("4f7c1d2a-9a55-4d0e-b0a1-6c7e3c2f8d11")

Id = Annotated[str, StringConstraints(min_length=1, max_length=v.MAX_ID_LENGTH)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ItemDoc(_Doc):
    key: Id
    value: Any
    version: PositiveInt
    session_id: Id | None = None
    namespace: Id
    created_at: AwareDatetime
    updated_at: AwareDatetime
    expires_at: AwareDatetime | None = None


class MemoryDoc(_Doc):
    memory_id: Id
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    importance: float = Field(ge=0)
    session_id: Id | None = None
    namespace: Id
    created_at: AwareDatetime
    last_accessed_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    source: str | None = None
    dimensions: PositiveInt
    embedding: str


class MemoriesDoc(_Doc):
    """What ``export_memories`` returns and ``import_memories`` takes."""

    format: Literal["ctxengine.memories"]
    format_version: Literal[1]
    exported_at: AwareDatetime | None = None
    user_id: Id | None
    namespace: Id | None = None
    items: list[ItemDoc] = Field(default_factory=list)
    memories: list[MemoryDoc] = Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class MemoryOverview:
    """What ``ctxengine memory list`` prints: live counts per namespace and the first rows."""

    item_counts: dict[str, int]
    memory_counts: dict[str, int]
    items: list[MemoryItem]
    memories: list[MemoryRecord]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _parse(data: object) -> MemoriesDoc:
    """The document, its structure checked (ValidationError naming the problems)."""
    if not isinstance(data, Mapping):
        raise ValidationError(
            f"import_memories takes the dict export_memories returned, got {type(data).__name__}",
            field="data",
        )
    if data.get("format") != FORMAT:
        raise ValidationError(
            f"not a ctxengine memory export: 'format' is {data.get('format')!r}, "
            f"expected {FORMAT!r}",
            field="format",
        )
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValidationError(
            f"unsupported format_version {version!r}; this version of ctxengine reads "
            f"memory exports of format_version {FORMAT_VERSION}",
            field="format_version",
        )
    try:
        return MemoriesDoc.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors()[:5])
        count = exc.error_count()
        raise ValidationError(
            f"malformed memory export ({count} problem{'s' if count > 1 else ''}): "
            f"{problems}; nothing was written",
            field="data",
        ) from None


def _location(loc: tuple[int | str, ...]) -> str:
    """``("memories", 0, "text")`` as ``memories[0].text``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text or "data"


def _vector(memory: MemoryDoc) -> bytes:
    """The stored bytes of an exported vector, checked: ``dimensions`` finite float32s
    of length 1."""
    try:
        data = base64.b64decode(memory.embedding, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("embedding is not base64", field="embedding") from None
    if len(data) != memory.dimensions * 4:
        raise ValidationError(
            f"embedding holds {len(data)} bytes; {memory.dimensions} dimensions "
            f"take {memory.dimensions * 4}",
            field="embedding",
        )
    vector = np.frombuffer(data, dtype="<f4")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    if not math.isfinite(norm) or abs(norm - 1.0) > _UNIT_SLACK:
        raise ValidationError(
            f"embedding is not a finite vector of length 1 (length {norm:g})",
            field="embedding",
        )
    return data


@contextmanager
def _entry(where: str) -> Iterator[None]:
    """Name the entry of the document a ValidationError raised inside is about."""
    try:
        yield
    except ValidationError as exc:
        raise ValidationError(
            f"malformed memory export, {where}: {exc}; nothing was written", field=exc.field
        ) from None


@dataclass(slots=True)
class _Plan:
    """An import, checked: the rows to write."""

    user: str
    items: list[dict[str, Any]]
    memories: list[dict[str, Any]]
    #: each namespace's dimension, of the memories to import
    dimensions: dict[str, int]


class MemoryTransferService:
    """export_memories / import_memories, and the overview of ``ctxengine memory list``."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.repo = MemoryTransferRepository(ctx.store.backend)
        self.semantic = SemanticMemoryRepository(ctx.store.backend)

    async def export(self, tenant: str, user_id: object, namespace: object) -> dict[str, Any]:
        user = v.optional_identifier(user_id, "user_id")
        space = None if namespace is None else v.identifier(namespace, "namespace")
        owner = NO_SCOPE if user is None else user

        async def work(conn: Connection, fx: Effects) -> dict[str, Any]:
            items = await self.repo.items(conn, tenant, owner, space, fx.now)
            memories = await self.repo.memories(conn, tenant, owner, space, fx.now)
            return {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "exported_at": fx.now.isoformat(),
                "user_id": user,
                "namespace": space,
                "items": [
                    {
                        "key": item.key,
                        "value": item.value,
                        "version": item.version,
                        "session_id": item.session_id or None,
                        "namespace": item.namespace,
                        "created_at": _iso(item.created_at),
                        "updated_at": _iso(item.updated_at),
                        "expires_at": _iso(item.expires_at),
                    }
                    for item in items
                ],
                "memories": [
                    {
                        "memory_id": memory.memory_id,
                        "text": memory.text,
                        "metadata": memory.metadata,
                        "importance": memory.importance,
                        "session_id": memory.session_id or None,
                        "namespace": memory.namespace,
                        "created_at": _iso(memory.created_at),
                        "last_accessed_at": _iso(memory.last_accessed_at),
                        "expires_at": _iso(memory.expires_at),
                        "source": memory.source,
                        "dimensions": memory.dimensions,
                        "embedding": base64.b64encode(memory.embedding).decode("ascii"),
                    }
                    for memory in memories
                ],
            }

        return await self.ctx.transact(work, write=False, operation="export_memories")

    async def import_(self, tenant: str, data: object, user_id: object) -> MemoryImportResult:
        doc = _parse(data)
        target = doc.user_id if user_id is ... else v.optional_identifier(user_id, "user_id")
        plan = self._plan(tenant, doc, target)

        async def work(conn: Connection, fx: Effects) -> MemoryImportResult:
            return await self._write(conn, fx, tenant, plan, target)

        return await self.ctx.transact(work, operation="import_memories")

    def _plan(self, tenant: str, doc: MemoriesDoc, target: str | None) -> _Plan:
        """Every entry of ``doc`` checked as the calls that write them check, as rows
        of the scopes of ``target``; ValidationError naming the first bad one."""
        plan = _Plan(NO_SCOPE if target is None else target, [], [], {})
        keys: set[tuple[str, str, str]] = set()
        for n, item in enumerate(doc.items):
            with _entry(f"items[{n}]"):
                row = self._item_row(tenant, target, item)
                scoped = (row["session_id"], row["namespace"], row["key"])
                if scoped in keys:
                    raise ValidationError(f"key {row['key']!r} appears twice in one scope")
                keys.add(scoped)
                plan.items.append(row)
        copy = target != doc.user_id
        ids: set[str] = set()
        sources: set[str] = set()
        for n, memory in enumerate(doc.memories):
            with _entry(f"memories[{n}]"):
                row = self._memory_row(tenant, target, memory)
                if row["memory_id"] in ids:
                    raise ValidationError(f"memory_id {row['memory_id']!r} appears twice")
                ids.add(row["memory_id"])
                if row["source"] is not None:
                    if row["source"] in sources:
                        raise ValidationError(f"source {row['source']!r} appears twice")
                    sources.add(row["source"])
                known = plan.dimensions.setdefault(row["namespace"], row["dimensions"])
                if known != row["dimensions"]:
                    raise ValidationError(
                        f"{row['dimensions']} dimensions, where other memories of namespace "
                        f"{row['namespace']!r} have {known} (one embedder per namespace)",
                        field="embedding",
                    )
                if copy:  # ids of the user's own, the same at each import
                    row["memory_id"] = str(
                        uuid.uuid5(_COPY_IDS, f"{plan.user}\n{row['memory_id']}")
                    )
                plan.memories.append(row)
        return plan

    def _item_row(self, tenant: str, target: str | None, item: ItemDoc) -> dict[str, Any]:
        where = memory_scope(tenant, target, item.session_id, item.namespace)
        return {
            "tenant_id": tenant,
            "user_id": where.user_id,
            "session_id": where.session_id,
            "namespace": where.namespace,
            "key": v.identifier(item.key, "key"),
            "value": memory_value(item.value, self.ctx.settings.max_metadata_bytes),
            "version": item.version,
            "created_at": item.created_at,
            "updated_at": item.updated_at,
            "expires_at": item.expires_at,
        }

    def _memory_row(self, tenant: str, target: str | None, memory: MemoryDoc) -> dict[str, Any]:
        settings = self.ctx.settings
        where = memory_scope(tenant, target, memory.session_id, memory.namespace)
        text = v.text(memory.text, "text", settings.max_message_bytes)
        if not text.strip():
            raise ValidationError("text must not be empty", field="text")
        source = memory.source
        if source is not None:
            source = v.text(source, "source", MAX_SOURCE_BYTES)
            if not source.strip():
                raise ValidationError("source must not be empty", field="source")
        return {
            "tenant_id": tenant,
            "memory_id": v.identifier(memory.memory_id, "memory_id"),
            "user_id": where.user_id,
            "session_id": where.session_id,
            "namespace": where.namespace,
            "text": text,
            "metadata": v.json_object(memory.metadata, "metadata", settings.max_metadata_bytes),
            "importance": memory.importance,
            "dimensions": memory.dimensions,
            "embedding": _vector(memory),
            "created_at": memory.created_at,
            "last_accessed_at": memory.last_accessed_at,
            "expires_at": memory.expires_at,
            "source": source,
        }

    async def _write(
        self, conn: Connection, fx: Effects, tenant: str, plan: _Plan, target: str | None
    ) -> MemoryImportResult:
        # the locks add_memory takes, in its order: the user's (one import or capped add
        # at a time: the second finds what the first wrote, and the cap holds), then
        # each new namespace's while its first vectors settle its dimension
        lock = self.ctx.store.backend.lock
        await lock(conn, user_lock(tenant, plan.user))
        # the namespaces' dimensions first: a mismatch writes nothing
        for namespace, wanted in sorted(plan.dimensions.items()):
            stored = await self.semantic.dimensions(conn, tenant, namespace)
            if stored is None:  # the namespace's first vectors, as add_memory settles them
                await lock(conn, namespace_lock(tenant, namespace))
                stored = await self.semantic.dimensions(conn, tenant, namespace)
            if stored is not None and stored != wanted:
                raise ValidationError(
                    f"namespace {namespace!r} holds vectors of {stored} dimensions; the "
                    f"export's have {wanted} (one embedder per namespace); nothing was written",
                    field="embedding",
                )

        # key-value items: those stored already with the same value and expiry stay
        items = [i for i in plan.items if i["expires_at"] is None or i["expires_at"] > fx.now]
        stored_items = await self.repo.live_values(
            conn, tenant, plan.user, {i["namespace"] for i in items}, fx.now
        )
        changed = []
        for item in items:
            found = stored_items.get((item["session_id"], item["namespace"], item["key"]))
            if found is not None and (
                _canonical(found[0]) == _canonical(item["value"]) and found[1] == item["expires_at"]
            ):
                continue
            changed.append({**item, "now": fx.now})
        await self.repo.put_items(conn, changed)

        # semantic memories: those present (by id, or by source in the user's scopes)
        # are skipped; expired holders of an id or source are absent, and replaced
        memories = [m for m in plan.memories if m["expires_at"] is None or m["expires_at"] > fx.now]
        holders = await self.repo.holders(
            conn,
            tenant,
            [m["memory_id"] for m in memories],
            [m["source"] for m in memories if m["source"] is not None],
            fx.now,
        )
        by_id = {h.memory_id: h for h in holders}
        by_source = {h.source: h for h in holders if h.source is not None}
        await self.repo.delete_memories(conn, tenant, [h.memory_id for h in holders if not h.alive])
        added = []
        for memory in memories:
            held = by_id.get(memory["memory_id"])
            if held is not None and held.alive:
                continue
            source = memory["source"]
            owner = by_source.get(source) if source is not None else None
            if owner is not None and owner.alive:
                if owner.user_id == plan.user:
                    continue  # this user has the memory of that source already
                memory = {**memory, "source": None}  # that source is another user's
            added.append(memory)
        await self.repo.insert_memories(conn, added)
        for memory in added:
            fx.emit(
                "memory.added",
                tenant,
                memory["session_id"] or None,
                memory["user_id"] or None,
                memory_id=memory["memory_id"],
                namespace=memory["namespace"],
            )
        keep = self.ctx.settings.max_memories_per_user
        if keep is not None and plan.user != NO_SCOPE and added:
            for memory_id in await self.semantic.evict(conn, tenant, plan.user, keep, fx.now):
                fx.emit("memory.deleted", tenant, memory_id=memory_id, reason="evicted")
        return MemoryImportResult(
            user_id=target,
            items_written=len(changed),
            items_unchanged=len(items) - len(changed),
            memories_added=len(added),
            memories_present=len(memories) - len(added),
            expired=len(plan.items) - len(items) + len(plan.memories) - len(memories),
        )

    async def overview(
        self,
        tenant: str,
        user_id: object,
        namespace: object,
        prefix: object,
        limit: object,
        by_importance: bool,
    ) -> MemoryOverview:
        user = v.optional_identifier(user_id, "user_id")
        owner = NO_SCOPE if user is None else user
        space = None if namespace is None else v.identifier(namespace, "namespace")
        start = None if prefix is None else v.identifier(prefix, "prefix")
        size = v.limit(limit)

        async def work(conn: Connection, fx: Effects) -> MemoryOverview:
            repo, now = self.repo, fx.now
            return MemoryOverview(
                await repo.item_counts(conn, tenant, owner, space, start, now),
                await repo.memory_counts(conn, tenant, owner, space, now),
                await repo.first_items(conn, tenant, owner, space, start, size, now),
                await repo.first_memories(conn, tenant, owner, space, size, by_importance, now),
            )

        return await self.ctx.transact(work, write=False, operation="memory_overview")
