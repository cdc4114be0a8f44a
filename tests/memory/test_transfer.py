"""Export and import of a user's memories (SPEC §13, issue 18): the round trip (values,
versions, timestamps, vectors bit for bit, search results), another user, idempotent
re-import, bad documents refused with nothing written, expiry, namespaces and tenants,
on SQLite files and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import HashingEmbedder
from ctxengine.errors import ValidationError
from ctxengine.models import Event, MemoryImportResult
from tests.fixtures import FakeClock

HASHING = EngineSettings(auto_cleanup=False, embedder=HashingEmbedder(64))


async def rows(engine: ContextEngine, sql: str, **params: Any) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def everything(engine: ContextEngine) -> list[Any]:
    """Every memory row of every tenant (items, then memories with their vectors)."""
    items = await rows(
        engine,
        "SELECT tenant_id, user_id, session_id, namespace, key, version, created_at, "
        "updated_at, expires_at FROM ctx_memory_items "
        "ORDER BY tenant_id, user_id, session_id, namespace, key",
    )
    memories = await rows(
        engine,
        "SELECT tenant_id, memory_id, user_id, session_id, namespace, text, importance, "
        "dimensions, embedding, created_at, last_accessed_at, expires_at, source "
        "FROM ctx_memories ORDER BY tenant_id, memory_id",
    )
    return [tuple(r) for r in items] + [(*r[:8], bytes(r[8]), *r[9:]) for r in memories]


def without_time_of_export(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "exported_at"}


@pytest.fixture
async def mem(db_url: str, clock: FakeClock) -> AsyncIterator[ContextEngine]:
    async with ContextEngine(db_url, settings=HASHING, clock=clock) as engine:
        yield engine
        assert engine._store.connections_in_use() == 0


async def seed_ann(engine: ContextEngine, clock: FakeClock) -> None:
    """ann's memories in two namespaces, one narrowed to a session, with versions,
    TTLs, metadata, importance and a source; others' memories beside them."""
    await engine.create_session("s1", "ann")
    await engine.remember("lang", "fr", user_id="ann")
    clock.advance(1)
    await engine.remember("lang", {"code": "de", "n": [1, 2.5, True, None]}, user_id="ann")
    await engine.remember("plan", ["a", "b"], user_id="ann", session_id="s1", ttl=3600)
    await engine.remember("tone", "dry", user_id="ann", namespace="agent")
    await engine.add_memory(
        "my flight to Lisbon leaves on Tuesday",
        user_id="ann",
        metadata={"kind": "travel", "flag": True},
        importance=2.5,
    )
    clock.advance(1)
    await engine.add_memory("I like green tea with honey", user_id="ann", ttl=7200)
    await engine.add_memory("the report is due Friday", user_id="ann", session_id="s1")
    await engine.add_memory("ann prefers short answers", user_id="ann", namespace="agent")
    await engine.add_memory("from a message", user_id="ann", source="message/m1")
    # not ann's: the tenant-wide scope, another user, another tenant
    await engine.remember("lang", "en")
    await engine.add_memory("everyone likes tea")
    await engine.remember("lang", "it", user_id="bob")
    await engine.add_memory("bob likes coffee", user_id="bob")
    await engine.tenant("acme").remember("lang", "nl", user_id="ann")
    await engine.tenant("acme").add_memory("acme ann likes cocoa", user_id="ann")


def search_view(hits: list[Any]) -> list[tuple[str, str, float]]:
    return [(h.record.memory_id, h.record.text, h.score) for h in hits]


async def test_round_trip(mem: ContextEngine, clock: FakeClock) -> None:
    await seed_ann(mem, clock)
    clock.advance(5)
    before = await mem.search_memory("tea with honey", user_id="ann", limit=10)
    exported = await mem.export_memories("ann")
    doc = json.loads(json.dumps(exported))  # JSON-safe as it is
    assert doc == exported
    assert (doc["format"], doc["format_version"], doc["user_id"]) == (
        "ctxengine.memories",
        1,
        "ann",
    )
    assert doc["namespace"] is None
    assert [(i["namespace"], i["session_id"], i["key"], i["version"]) for i in doc["items"]] == [
        ("agent", None, "tone", 1),
        ("default", None, "lang", 2),
        ("default", "s1", "plan", 1),
    ]
    assert doc["items"][1]["value"] == {"code": "de", "n": [1, 2.5, True, None]}
    assert doc["items"][2]["expires_at"] is not None
    assert [m["text"] for m in doc["memories"]] == [
        "my flight to Lisbon leaves on Tuesday",
        "I like green tea with honey",
        "the report is due Friday",
        "ann prefers short answers",
        "from a message",
    ]
    flight = doc["memories"][0]
    assert flight["metadata"] == {"kind": "travel", "flag": True}
    assert flight["importance"] == 2.5 and flight["dimensions"] == 64
    assert len(base64.b64decode(flight["embedding"])) == 64 * 4
    assert doc["memories"][2]["session_id"] == "s1"
    assert doc["memories"][4]["source"] == "message/m1"
    rows_before = await everything(mem)

    assert await mem.forget_user("ann") == 3 + 5
    assert await mem.export_memories("ann") == {**doc, "exported_at": clock.now.isoformat()} | {
        "items": [],
        "memories": [],
    }
    seen: list[Event] = []
    mem.subscribe(seen.append, "memory.added")
    result = await mem.import_memories(doc)
    assert result == MemoryImportResult(
        user_id="ann",
        items_written=3,
        items_unchanged=0,
        memories_added=5,
        memories_present=0,
        expired=0,
    )
    assert sorted(e.data["memory_id"] for e in seen) == sorted(
        m["memory_id"] for m in doc["memories"]
    )
    # every row as it was: values, versions, timestamps, the vectors bit for bit
    assert await everything(mem) == rows_before
    assert without_time_of_export(await mem.export_memories("ann")) == without_time_of_export(doc)
    item = await mem.get_memory("lang", user_id="ann")
    assert item is not None and item.version == 2
    assert await mem.recall("plan", user_id="ann", session_id="s1") == ["a", "b"]
    assert await mem.count_memories(user_id="ann") == 4
    assert await mem.count_memories(user_id="ann", namespace="agent") == 1
    after = await mem.search_memory("tea with honey", user_id="ann", limit=10)
    assert search_view(after) == search_view(before)
    assert [h.record for h in after] == [h.record for h in before]
    # the next write goes on from the version imported
    assert (await mem.remember("lang", "pt", user_id="ann")).version == 3


async def test_import_into_another_user(mem: ContextEngine, clock: FakeClock) -> None:
    await seed_ann(mem, clock)
    doc = await mem.export_memories("ann")
    ann_rows = await everything(mem)
    result = await mem.import_memories(doc, user_id="carl")
    assert result.user_id == "carl"
    assert (result.items_written, result.memories_added) == (3, 5)
    assert await mem.recall("lang", user_id="carl") == {"code": "de", "n": [1, 2.5, True, None]}
    assert await mem.recall("plan", user_id="carl", session_id="s1") == ["a", "b"]
    assert await mem.count_memories(user_id="carl") == 4
    assert await mem.recall("lang", user_id="ann") == {"code": "de", "n": [1, 2.5, True, None]}
    assert await mem.count_memories(user_id="ann") == 4
    assert [r for r in await everything(mem) if "carl" not in r] == ann_rows  # untouched
    copied = await mem.export_memories("carl")
    ann_ids = {m["memory_id"] for m in doc["memories"]}
    assert not ann_ids & {m["memory_id"] for m in copied["memories"]}  # ids of their own
    by_text = {m["text"]: m for m in doc["memories"]}
    for mine in copied["memories"]:
        theirs = by_text.pop(mine["text"])
        for field in ("embedding", "metadata", "importance", "created_at", "session_id"):
            assert mine[field] == theirs[field]
    assert not by_text
    # a tenant holds one memory per source: ann's keeps it, the copy has none
    assert [m["source"] for m in copied["memories"]] == [None] * 5
    ann_hits = await mem.search_memory("green tea", user_id="ann", include_shared=False)
    carl_hits = await mem.search_memory("green tea", user_id="carl", include_shared=False)
    assert [(h.record.text, h.score) for h in carl_hits] == [
        (h.record.text, h.score) for h in ann_hits
    ]
    # importing again into carl adds nothing
    again = await mem.import_memories(doc, user_id="carl")
    assert (again.items_written, again.items_unchanged) == (0, 3)
    assert (again.memories_added, again.memories_present) == (0, 5)
    assert await mem.count_memories(user_id="carl") == 4


async def test_the_tenant_wide_scope(mem: ContextEngine, clock: FakeClock) -> None:
    await seed_ann(mem, clock)
    shared = await mem.export_memories(None)
    assert shared["user_id"] is None
    assert [i["value"] for i in shared["items"]] == ["en"]
    assert [m["text"] for m in shared["memories"]] == ["everyone likes tea"]
    acme = mem.tenant("acme")
    result = await acme.import_memories(shared)
    assert result.user_id is None and (result.items_written, result.memories_added) == (1, 1)
    assert await acme.recall("lang") == "en"
    assert await acme.count_memories() == 1
    # a user's export into the tenant-wide scope: a session narrows a user's scope only
    with pytest.raises(ValidationError, match="session_id"):
        await mem.import_memories(await mem.export_memories("ann"), user_id=None)


async def test_reimport_is_idempotent(mem: ContextEngine, clock: FakeClock) -> None:
    await seed_ann(mem, clock)
    doc = await mem.export_memories("ann")
    stored = await everything(mem)
    clock.advance(10)
    result = await mem.import_memories(doc)
    assert result == MemoryImportResult(
        user_id="ann",
        items_written=0,
        items_unchanged=3,
        memories_added=0,
        memories_present=5,
        expired=0,
    )
    assert await everything(mem) == stored  # not a version, not a timestamp changed

    # what changed since the export is put back, as remember would: one version more
    await mem.remember("lang", "es", user_id="ann")  # version 3
    await mem.forget("tone", user_id="ann", namespace="agent")
    tea = next(m for m in doc["memories"] if "tea" in m["text"])
    assert await mem.delete_memory(tea["memory_id"])
    result = await mem.import_memories(doc)
    assert (result.items_written, result.items_unchanged) == (2, 1)
    assert (result.memories_added, result.memories_present) == (1, 4)
    lang = await mem.get_memory("lang", user_id="ann")
    assert lang is not None and lang.value == doc["items"][1]["value"]
    assert lang.version == 4 and lang.updated_at == clock.now
    tone = await mem.get_memory("tone", user_id="ann", namespace="agent")
    assert tone is not None and tone.version == 1  # came back as exported
    assert await mem.count_memories(user_id="ann") == 4

    # the same source, added again since under another id: present, not doubled
    message = next(m for m in doc["memories"] if m["source"] == "message/m1")
    assert await mem.delete_memory(message["memory_id"])
    readded = await mem.add_memory("from a message", user_id="ann", source="message/m1")
    result = await mem.import_memories(doc)
    assert (result.memories_added, result.memories_present) == (0, 5)
    sources = await rows(mem, "SELECT memory_id FROM ctx_memories WHERE source = 'message/m1'")
    assert [r[0] for r in sources] == [readded.memory_id]


async def test_expired_memories_are_neither_exported_nor_imported(
    mem: ContextEngine, clock: FakeClock
) -> None:
    await mem.remember("short", 1, user_id="ann", ttl=10)
    await mem.remember("long", 2, user_id="ann", ttl=1000)
    await mem.add_memory("brief memory", user_id="ann", ttl=10)
    await mem.add_memory("lasting memory", user_id="ann", ttl=1000)
    clock.advance(11)
    doc = await mem.export_memories("ann")
    assert [i["key"] for i in doc["items"]] == ["long"]
    assert [m["text"] for m in doc["memories"]] == ["lasting memory"]
    await mem.forget_user("ann")
    clock.advance(1000)  # what the export holds has expired too by now
    result = await mem.import_memories(doc)
    assert result.expired == 2 and result.items_written == result.memories_added == 0
    assert await everything(mem) == []
    # an expired row still stored (not swept yet) does not stand in the way
    clock.advance(-1000)
    await mem.forget_user("ann")
    result = await mem.import_memories(doc)
    assert (result.items_written, result.memories_added) == (1, 1)
    clock.advance(1000)
    assert await mem.count_memories(user_id="ann") == 0
    result = await mem.import_memories(doc)
    assert result.expired == 2


async def test_expired_holders_are_replaced(mem: ContextEngine, clock: FakeClock) -> None:
    await mem.remember("k", "v", user_id="ann", ttl=100)
    await mem.add_memory("text", user_id="ann", ttl=100, source="s/1")
    doc = await mem.export_memories("ann")
    for entry in doc["items"] + doc["memories"]:
        entry["expires_at"] = None
    clock.advance(200)  # the stored ones expired, but are still there (no sweep)
    result = await mem.import_memories(doc)
    assert (result.items_written, result.memories_added) == (1, 1)
    item = await mem.get_memory("k", user_id="ann")
    assert item is not None and item.version == 1 and item.expires_at is None
    (found,) = await rows(mem, "SELECT expires_at, source FROM ctx_memories")
    assert found == (None, "s/1")


async def test_one_namespace(mem: ContextEngine, clock: FakeClock) -> None:
    await seed_ann(mem, clock)
    doc = await mem.export_memories("ann", namespace="agent")
    assert doc["namespace"] == "agent"
    assert [i["key"] for i in doc["items"]] == ["tone"]
    assert [m["text"] for m in doc["memories"]] == ["ann prefers short answers"]


async def test_tenants_are_isolated(mem: ContextEngine, clock: FakeClock) -> None:
    await seed_ann(mem, clock)
    acme = mem.tenant("acme")
    acme_doc = await acme.export_memories("ann")
    assert [i["value"] for i in acme_doc["items"]] == ["nl"]
    assert [m["text"] for m in acme_doc["memories"]] == ["acme ann likes cocoa"]
    default_doc = await mem.export_memories("ann")
    assert "nl" not in json.dumps(default_doc) and "cocoa" not in json.dumps(default_doc)
    # ann of default into acme: same ids, other tenant, so nothing is present there
    result = await acme.import_memories(default_doc)
    assert (result.items_written, result.items_unchanged) == (3, 0)
    assert result.memories_added == 5
    assert await acme.count_memories(user_id="ann") == 5  # cocoa and four of default's
    assert await mem.count_memories(user_id="ann") == 4  # untouched
    assert await mem.tenant("globex").export_memories("ann") == {
        **acme_doc,
        "exported_at": clock.now.isoformat(),
        "items": [],
        "memories": [],
    }
    await acme.forget_user("ann")
    assert len((await mem.export_memories("ann"))["memories"]) == 5


async def test_retention_applies_to_imports(db_url: str, clock: FakeClock) -> None:
    settings = HASHING.model_copy(update={"max_memories_per_user": 2})
    async with ContextEngine(db_url, settings=HASHING, clock=clock) as engine:
        for n, importance in enumerate((1.0, 3.0, 2.0)):
            await engine.add_memory(f"memory {n}", user_id="ann", importance=importance)
        doc = await engine.export_memories("ann")
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        await engine.forget_user("ann")
        result = await engine.import_memories(doc)
        assert result.memories_added == 3
        kept = (await engine.export_memories("ann"))["memories"]
        assert sorted(m["text"] for m in kept) == ["memory 1", "memory 2"]


def _vector_of(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[int(last) if last.isdigit() else last]
        else:
            node[int(last) if last.isdigit() else last] = value

    return change


_DELETE = object()


BAD_DOCUMENTS: dict[str, Callable[[dict[str, Any]], None]] = {
    "no format": _set("format", _DELETE),
    "another format": _set("format", "ctxengine.session"),
    "a newer format_version": _set("format_version", 2),
    "format_version as text": _set("format_version", "1"),
    "an unknown field": _set("extra", 1),
    "items not a list": _set("items", {"a": 1}),
    "an item of null": _set("items.0.value", None),
    "an item without key": _set("items.0.key", _DELETE),
    "an empty key": _set("items.0.key", ""),
    "a key with NUL": _set("items.0.key", "a\x00b"),
    "version 0": _set("items.0.version", 0),
    "a naive timestamp": _set("items.0.created_at", "2030-01-01T00:00:00"),
    "a date that is none": _set("items.1.updated_at", "tomorrow"),
    "a value too deep": _set("items.0.value", json.loads("[" * 70 + "]" * 70)),
    "a key twice": lambda doc: doc["items"].append(copy.deepcopy(doc["items"][0])),
    "empty text": _set("memories.0.text", "  "),
    "metadata not an object": _set("memories.0.metadata", [1]),
    "negative importance": _set("memories.0.importance", -1),
    "NaN importance": _set("memories.0.importance", math.nan),
    "embedding not base64": _set("memories.0.embedding", "not base64!"),
    "embedding too short": _set("memories.0.embedding", _vector_of([1.0] * 63)),
    "embedding NaN": _set("memories.0.embedding", _vector_of([math.nan] + [0.0] * 63)),
    "embedding not of length 1": _set("memories.0.embedding", _vector_of([0.5] + [0.0] * 63)),
    "dimensions that disagree": _set("memories.0.dimensions", 63),
    "two dimensions in one namespace": lambda doc: doc["memories"][1].update(
        dimensions=3, embedding=_vector_of([1.0, 0.0, 0.0])
    ),
    "a memory_id twice": lambda doc: doc["memories"][1].update(
        memory_id=doc["memories"][0]["memory_id"]
    ),
    "a source twice": lambda doc: [m.update(source="same") for m in doc["memories"][:2]],
    "an empty source": _set("memories.0.source", ""),
    "the last entry bad": _set("memories.4.namespace", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_DOCUMENTS))
async def test_bad_documents_write_nothing(mem: ContextEngine, clock: FakeClock, case: str) -> None:
    await seed_ann(mem, clock)
    doc = await mem.export_memories("ann")
    await mem.forget_user("ann")
    stored = await everything(mem)
    bad = copy.deepcopy(doc)
    BAD_DOCUMENTS[case](bad)
    with pytest.raises(ValidationError):
        await mem.import_memories(bad)
    with pytest.raises(ValidationError):
        await mem.import_memories(bad, user_id="carl")
    assert await everything(mem) == stored
    assert (await mem.import_memories(doc)).memories_added == 5  # the good one still goes in


@pytest.mark.parametrize("data", [None, [], "{}", 1])
async def test_not_a_document(mem: ContextEngine, data: Any) -> None:
    with pytest.raises(ValidationError, match="export_memories"):
        await mem.import_memories(data)


async def test_a_newer_format_version_is_named(mem: ContextEngine) -> None:
    doc = await mem.export_memories("ann")
    with pytest.raises(ValidationError, match="unsupported format_version 2"):
        await mem.import_memories({**doc, "format_version": 2})


async def test_dimensions_must_match_the_namespace(
    mem: ContextEngine, clock: FakeClock, db_url: str
) -> None:
    await seed_ann(mem, clock)
    doc = await mem.export_memories("ann")
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as plain:
        three = [1.0, 0.0, 0.0]
        await plain.tenant("other").add_memory("three dimensions", user_id="zed", embedding=three)
    other = mem.tenant("other")
    with pytest.raises(ValidationError, match="3 dimensions"):
        await other.import_memories(doc)
    # nothing written: not the items either, nor the other namespace's memory
    assert await other.export_memories("ann") == {
        **doc,
        "exported_at": clock.now.isoformat(),
        "items": [],
        "memories": [],
    }
    only_agent = await mem.export_memories("ann", namespace="agent")
    only_agent["memories"] = [
        {**m, "namespace": "fresh"} for m in only_agent["memories"]
    ]  # a namespace the tenant has no vectors in takes them
    assert (await other.import_memories(only_agent)).memories_added == 1


async def test_bad_arguments(mem: ContextEngine) -> None:
    with pytest.raises(ValidationError):
        await mem.export_memories("")
    with pytest.raises(ValidationError):
        await mem.export_memories("ann", namespace="")
    doc = await mem.export_memories("ann")
    with pytest.raises(ValidationError):
        await mem.import_memories(doc, user_id=" ")


async def test_imports_at_once_store_each_memory_once(
    mem: ContextEngine, clock: FakeClock, db_url: str
) -> None:
    await seed_ann(mem, clock)
    doc = await mem.export_memories("ann")
    engines = [ContextEngine(db_url, settings=HASHING, clock=clock) for _ in range(3)]
    for engine in engines:
        await engine.initialize()
    try:
        # the whole document, and memories alone of a namespace holding vectors already
        # (neither the items' row locks nor a new namespace's lock make the imports queue)
        default = {**await mem.export_memories("ann", namespace="default"), "items": []}
        for document in (doc, default):
            await mem.forget_user("ann")
            results = await asyncio.gather(*(e.import_memories(document) for e in engines))
            added = len(document["memories"])
            assert sorted(r.memories_added for r in results) == [0, 0, added]
            assert sum(r.items_written for r in results) == len(document["items"])
            assert len((await mem.export_memories("ann"))["memories"]) == added
    finally:
        for engine in engines:
            await engine.close()
    await mem.import_memories(doc)
    assert without_time_of_export(await mem.export_memories("ann")) == without_time_of_export(doc)
