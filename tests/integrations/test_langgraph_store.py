"""ContextEngineStore against the real LangGraph (BaseStore, a compiled graph), on
SQLite files and PostgreSQL; semantic search with HashingEmbedder."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, TypedDict

import asyncpg
import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    ListNamespacesOp,
    PutOp,
    SearchOp,
)
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, sync
from ctxengine.embeddings import FunctionEmbedder, HashingEmbedder
from ctxengine.errors import ValidationError
from ctxengine.integrations.langgraph import ContextEngineStore
from tests.cluster import Cluster
from tests.fixtures import FakeClock
from tests.pgvector import pgvector_cluster  # noqa: F401

from . import _langgraph_store_workers as workers

SETTINGS = EngineSettings(auto_cleanup=False)
INDEX: Any = {"dims": 64, "embed": HashingEmbedder(64), "fields": ["text"]}


@pytest.fixture
async def eng(db_url: str, clock: FakeClock) -> AsyncIterator[ContextEngine]:
    """An engine on the test clock."""
    async with ContextEngine(db_url, settings=SETTINGS, clock=clock) as engine:
        yield engine
        assert engine._store.connections_in_use() == 0


@pytest.fixture
def store(eng: ContextEngine) -> ContextEngineStore:
    return ContextEngineStore(eng)


@pytest.fixture
def indexed(eng: ContextEngine) -> ContextEngineStore:
    return ContextEngineStore(eng, index=INDEX)


async def rows(engine: ContextEngine, sql: str, **params: Any) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def item_rows(engine: ContextEngine) -> list[tuple[Any, ...]]:
    """Every row of the key-value table: (tenant, user, namespace, key)."""
    found = await rows(
        engine,
        "SELECT tenant_id, user_id, namespace, key FROM ctx_memory_items "
        "ORDER BY tenant_id, user_id, namespace, key",
    )
    return [tuple(row) for row in found]


async def vector_rows(engine: ContextEngine) -> list[tuple[str, Any]]:
    """(text, metadata) of every semantic memory, by text."""
    found = await rows(engine, "SELECT text, metadata FROM ctx_memories ORDER BY text")
    return [(r[0], r[1] if not isinstance(r[1], str) else json.loads(r[1])) for r in found]


async def ttl_column(engine: ContextEngine) -> list[tuple[Any, ...]]:
    """(namespace, key, ttl_seconds) of every item, by namespace and key."""
    found = await rows(
        engine, "SELECT namespace, key, ttl_seconds FROM ctx_memory_items ORDER BY namespace, key"
    )
    return [tuple(row) for row in found]


def keys(items: list[Any]) -> list[str]:
    return [item.key for item in items]


# -- the contract -----------------------------------------------------------------------


def test_it_is_a_complete_base_store() -> None:
    assert issubclass(ContextEngineStore, BaseStore)
    assert not ContextEngineStore.__abstractmethods__
    assert ContextEngineStore.supports_ttl


# -- put, get, delete -------------------------------------------------------------------


async def test_put_get_update_delete(
    store: ContextEngineStore, eng: ContextEngine, clock: FakeClock
) -> None:
    assert await store.aget(("users", "u1"), "prefs") is None
    await store.aput(("users", "u1"), "prefs", {"theme": "dark", "n": [1, 2]})
    item = await store.aget(("users", "u1"), "prefs")
    assert item is not None
    assert item.namespace == ("users", "u1") and item.key == "prefs"
    assert item.value == {"theme": "dark", "n": [1, 2]}
    assert item.created_at == item.updated_at == clock.now
    created = item.created_at

    clock.advance(10)
    await store.aput(("users", "u1"), "prefs", {"theme": "light"})
    item = await store.aget(("users", "u1"), "prefs")
    assert item is not None and item.value == {"theme": "light"}
    assert item.created_at == created and item.updated_at == clock.now

    # a tenant-wide key-value memory: the namespace's labels joined by "."
    assert await eng.recall("prefs", namespace="users.u1") == {"theme": "light"}
    assert await item_rows(eng) == [("default", "", "users.u1", "prefs")]

    await store.adelete(("users", "u1"), "prefs")
    assert await store.aget(("users", "u1"), "prefs") is None
    await store.adelete(("users", "u1"), "prefs")  # nothing there: no error
    assert await item_rows(eng) == []


async def test_a_batch_reads_before_it_writes_and_writes_the_last_put(
    store: ContextEngineStore, eng: ContextEngine
) -> None:
    await store.aput(("a",), "k", {"v": 0})
    results = await store.abatch(
        [
            PutOp(("a",), "k", {"v": 1}),
            GetOp(("a",), "k"),
            PutOp(("a",), "k", {"v": 2}),
            PutOp(("a",), "gone", {"v": 3}),
            PutOp(("a",), "gone", None),
            SearchOp(("a",)),
            ListNamespacesOp(),
        ]
    )
    got = results[1]
    assert got is not None and got.value == {"v": 0}  # type: ignore[union-attr]
    assert [i.value for i in results[5]] == [{"v": 0}]  # type: ignore[union-attr]
    assert results[6] == [("a",)]
    assert results[0] is results[2] is results[3] is results[4] is None
    after = await store.aget(("a",), "k")
    assert after is not None and after.value == {"v": 2}
    assert await store.aget(("a",), "gone") is None


async def test_bad_input_is_refused_and_writes_nothing(
    store: ContextEngineStore, eng: ContextEngine
) -> None:
    bad: list[tuple[Any, Any, Any, type[Exception]]] = [
        (("a.b",), "k", {"v": 1}, InvalidNamespaceError),
        ((), "k", {"v": 1}, InvalidNamespaceError),
        (("a", ""), "k", {"v": 1}, InvalidNamespaceError),
        (("langgraph",), "k", {"v": 1}, InvalidNamespaceError),
        (("a", 1), "k", {"v": 1}, InvalidNamespaceError),
        (("a",), "", {"v": 1}, ValidationError),
        (("a",), "k", ["not", "a", "dict"], ValidationError),
        (("a",), "k", "text", ValidationError),
        (("a",), "k", {1: "non-string key"}, ValidationError),
        (("a",), "k", {"v": object()}, ValidationError),
        (("x" * 200, "y" * 60), "k", {"v": 1}, ValidationError),  # 261 characters
    ]
    for namespace, key, value, error in bad:
        with pytest.raises(error):
            await store.abatch([PutOp(("ok",), "first", {"v": 1}), PutOp(namespace, key, value)])
    with pytest.raises(ValidationError, match="ttl"):
        await store.aput(("a",), "k", {"v": 1}, ttl=-1)
    with pytest.raises(InvalidNamespaceError):
        await store.aput(("a.b",), "k", {"v": 1})
    with pytest.raises(InvalidNamespaceError):
        await store.aget(("a.b",), "k")
    with pytest.raises(InvalidNamespaceError):
        await store.abatch([SearchOp(("a.b",))])
    with pytest.raises(ValidationError, match="operator"):
        await store.asearch(("a",), filter={"v": {"$regex": "x"}})
    with pytest.raises(ValidationError, match="limit"):
        await store.asearch(("a",), limit=-1)
    assert await item_rows(eng) == []  # not even the batch's good put


async def test_sync_methods_refuse_on_the_engines_loop(store: ContextEngineStore) -> None:
    with pytest.raises(NotImplementedError, match="aget"):
        store.get(("a",), "k")
    with pytest.raises(NotImplementedError, match="aput"):
        store.put(("a",), "k", {"v": 1})


async def test_sync_methods_work_from_another_thread(store: ContextEngineStore) -> None:
    def work() -> Any:
        store.put(("a",), "k", {"v": 1})
        return store.get(("a",), "k"), store.search(("a",)), store.list_namespaces()

    got, found, spaces = await asyncio.to_thread(work)
    assert got.value == {"v": 1} and keys(found) == ["k"] and spaces == [("a",)]


async def test_closed_store_refuses(eng: ContextEngine) -> None:
    async with ContextEngineStore(eng) as store:
        await store.aput(("a",), "k", {"v": 1})
    with pytest.raises(RuntimeError, match="closed"):
        await store.aget(("a",), "k")
    assert await eng.recall("k", namespace="a") == {"v": 1}  # the engine is open


# -- TTL (minutes) ------------------------------------------------------------------------


async def test_ttl_expires_items_and_reads_start_it_over(
    store: ContextEngineStore, eng: ContextEngine, clock: FakeClock
) -> None:
    await store.aput(("t",), "short", {"v": 1}, ttl=1)  # one minute
    await store.aput(("t",), "kept", {"v": 2})
    clock.advance(50)
    assert await store.aget(("t",), "short") is not None  # refreshed: 60 s from now
    clock.advance(50)
    assert await store.aget(("t",), "short", refresh_ttl=False) is not None
    clock.advance(5)  # 55 s since the refresh
    assert sorted(keys(await store.asearch(("t",)))) == ["kept", "short"]  # refreshed again
    clock.advance(59)
    assert sorted(keys(await store.asearch(("t",), refresh_ttl=False))) == ["kept", "short"]
    clock.advance(2)  # 61 s since the last refresh
    assert await store.aget(("t",), "short") is None
    assert keys(await store.asearch(("t",))) == ["kept"]
    assert await store.alist_namespaces() == [("t",)]
    # the cleanup task deletes the item: its one row, which holds its TTL
    assert await eng._runtime().memory.sweep() == 1
    assert await item_rows(eng) == [("default", "", "t", "kept")]


async def test_a_put_without_ttl_keeps_the_item(
    store: ContextEngineStore, eng: ContextEngine, clock: FakeClock
) -> None:
    await store.aput(("t",), "k", {"v": 1}, ttl=1)
    await store.aput(("t",), "k", {"v": 2})  # no TTL now
    clock.advance(3600)
    found = await store.aget(("t",), "k")
    assert found is not None and found.value == {"v": 2}
    assert await item_rows(eng) == [("default", "", "t", "k")]
    assert await ttl_column(eng) == [("t", "k", None)]  # no TTL left


async def test_the_ttl_is_a_column_of_the_items_row(
    store: ContextEngineStore, eng: ContextEngine, clock: FakeClock
) -> None:
    """The TTL is the item's ``ttl_seconds`` (one row per item); a refresh sets
    ``expires_at = now + ttl_seconds`` to the microsecond, also for items written by
    ``remember(ttl=...)``, and leaves items without a TTL alone."""
    await store.aput(("t",), "a", {"v": 1}, ttl=0.5)  # minutes
    await eng.remember("b", {"v": 2}, namespace="t", ttl=1.000001)  # seconds
    await eng.remember("c", {"v": 3}, namespace="t")
    assert await ttl_column(eng) == [("t", "a", 30.0), ("t", "b", 1.000001), ("t", "c", None)]
    assert len(await item_rows(eng)) == 3  # no other row
    clock.advance(0.654321)
    assert len(await store.asearch(("t",))) == 3  # refreshed
    a, b, c = [await eng.get_memory(k, namespace="t") for k in "abc"]
    assert a is not None and a.expires_at == clock.now + timedelta(seconds=30)
    assert b is not None and b.expires_at == clock.now + timedelta(seconds=1.000001)
    assert c is not None and c.expires_at is None
    clock.advance(1.000001)
    assert keys(await store.asearch(("t",))) == ["c", "a"]  # b expired at its instant
    await eng.remember("a", {"v": 4}, namespace="t")  # written without a TTL: none kept
    assert (await ttl_column(eng))[0] == ("t", "a", None)


async def test_a_user_named_as_the_old_ttl_rows_does_not_interfere(
    store: ContextEngineStore, eng: ContextEngine, clock: FakeClock
) -> None:
    """The store once kept each TTL in a row of the user "\x01langgraph-ttl" (same
    namespace and key), a user id ctxengine accepts: that user's memories overwrote
    the TTLs (reads stopped refreshing) and the store's puts overwrote theirs."""
    user = "\x01langgraph-ttl"
    await eng.remember("k", {"mine": 1}, user_id=user, namespace="t")
    await store.aput(("t",), "k", {"v": 1}, ttl=1)
    assert await eng.recall("k", user_id=user, namespace="t") == {"mine": 1}
    await eng.remember("k", {"mine": 2}, user_id=user, namespace="t")
    clock.advance(50)
    assert await store.aget(("t",), "k") is not None  # refreshed: 60 s from now
    clock.advance(50)
    assert await store.aget(("t",), "k", refresh_ttl=False) is not None
    assert await eng.forget_user(user) == 1  # their item, nothing of the store's
    assert await eng.recall("k", user_id=user, namespace="t") is None
    assert await store.aget(("t",), "k") is not None  # refreshed: 60 s from now
    clock.advance(59)
    assert await store.aget(("t",), "k", refresh_ttl=False) is not None
    clock.advance(2)
    assert await store.aget(("t",), "k") is None
    assert await item_rows(eng) == [("default", "", "t", "k")]
    assert await eng._runtime().memory.sweep() == 1
    assert await item_rows(eng) == []


async def test_default_ttl_and_refresh_on_read_from_the_config(
    eng: ContextEngine, clock: FakeClock
) -> None:
    store = ContextEngineStore(eng, ttl={"default_ttl": 2, "refresh_on_read": False})
    await store.aput(("t",), "k", {"v": 1})
    await store.aput(("t",), "forever", {"v": 1}, ttl=None)
    clock.advance(100)
    assert await store.aget(("t",), "k") is not None  # not refreshed
    clock.advance(21)
    assert await store.aget(("t",), "k") is None
    assert await store.aget(("t",), "forever") is not None


# -- search without a query -------------------------------------------------------------


async def test_search_lists_under_a_prefix_newest_first(
    store: ContextEngineStore, clock: FakeClock
) -> None:
    for namespace, key in [
        (("docs",), "root"),
        (("docs", "a"), "one"),
        (("docs", "a", "deep"), "two"),
        (("docsx",), "other"),  # "docs" is not its prefix
        (("d%",), "pct"),
        (("d_cs",), "underscore"),
        (("Docs",), "upper"),
    ]:
        clock.advance(1)
        await store.aput(namespace, key, {"k": key})
    assert keys(await store.asearch(("docs",))) == ["two", "one", "root"]
    assert keys(await store.asearch(("docs", "a"))) == ["two", "one"]
    assert keys(await store.asearch(("docs", "a", "deep"))) == ["two"]
    assert keys(await store.asearch(("d%",))) == ["pct"]
    assert keys(await store.asearch(("d_cs",))) == ["underscore"]
    assert keys(await store.asearch(("nothing",))) == []
    everything = ["upper", "underscore", "pct", "other", "two", "one", "root"]
    assert keys(await store.asearch(())) == everything
    assert keys(await store.asearch((), limit=3, offset=2)) == everything[2:5]
    assert keys(await store.asearch((), limit=0)) == []
    # an update moves an item first
    clock.advance(1)
    await store.aput(("docs",), "root", {"k": "root", "again": True})
    assert keys(await store.asearch(("docs",))) == ["root", "two", "one"]


async def test_prefixes_are_exact_under_a_linguistic_collation(pg_url: str) -> None:
    """With ctx_memory_items.namespace collated by ICU's en-US (a PostgreSQL database's
    default collation applies to it) a prefix still matches whole labels, exactly."""
    async with ContextEngine(pg_url, settings=SETTINGS) as engine:
        async with engine._store.engine.begin() as conn:
            await conn.execute(
                text(
                    "ALTER TABLE ctx_memory_items ALTER COLUMN namespace "
                    'TYPE varchar(255) COLLATE "en-US-x-icu"'
                )
            )
        ordered = await rows(
            engine,
            "SELECT n FROM (VALUES ('docsB'), ('docsa'), ('docs.a'), ('docs-x')) AS v(n) "
            'ORDER BY n COLLATE "en-US-x-icu"',
        )
        assert [r[0] for r in ordered] != sorted(r[0] for r in ordered)  # not code point order
        store = ContextEngineStore(engine)
        # "döcs.a" and "DOCS.a" sort between "docs." and "docs/" in en-US: a range
        # of the column's order would take them for namespaces under ("docs",)
        spaces = [
            ("docs",),
            ("docs", "a"),
            ("docs-x",),
            ("docsa",),
            ("Docs",),
            ("doc",),
            ("döcs", "a"),
            ("DOCS", "a"),
        ]
        for namespace in spaces:
            await store.aput(namespace, "k", {"v": 1})
        found = await store.asearch(("docs",))
        assert sorted(i.namespace for i in found) == [("docs",), ("docs", "a")]
        assert await store.alist_namespaces(prefix=("docs",)) == [("docs",), ("docs", "a")]
        assert [i.namespace for i in await store.asearch(("doc",))] == [("doc",)]
        assert len(await store.alist_namespaces()) == len(spaces)


async def test_search_filters(store: ContextEngineStore, clock: FakeClock) -> None:
    values = [
        ("a", {"color": "red", "score": 4.5, "flag": True, "tags": ["x"], "meta": {"k": 1}}),
        ("b", {"color": "blue", "score": 3, "flag": 1}),
        ("c", {"color": "red", "score": 2, "meta": {"k": 2, "extra": 0}}),
        ("d", {"name": "no color"}),
    ]
    for key, value in values:
        clock.advance(1)
        await store.aput(("f",), key, value)

    async def found(**filters: Any) -> list[str]:
        return sorted(keys(await store.asearch(("f",), filter=filters)))

    assert await found(color="red") == ["a", "c"]
    assert await found(color={"$eq": "red"}) == ["a", "c"]
    assert await found(color={"$ne": "red"}) == ["b", "d"]
    assert await found(score={"$gt": 2}) == ["a", "b"]
    assert await found(score={"$gte": 2, "$lt": 4.5}) == ["b", "c"]
    assert await found(score={"$lte": 3}) == ["b", "c"]
    assert await found(flag=True) == ["a"]  # JSON equality: true is not 1
    assert await found(flag=1) == ["b"]
    assert await found(tags=["x"]) == ["a"]
    assert await found(meta={"k": 2}) == ["c"]  # an object matches by its members
    assert await found(color="red", score={"$gt": 3}) == ["a"]
    assert await found(color="green") == []
    # limit and offset count the items that pass, newest first
    assert keys(await store.asearch(("f",), filter={"color": "red"}, limit=1)) == ["c"]
    assert keys(await store.asearch(("f",), filter={"color": "red"}, offset=1)) == ["a"]


async def test_a_filtered_search_reads_past_one_page(store: ContextEngineStore) -> None:
    # more than two reads' worth, one item in 50 passing, all written at once: equal
    # updated_at, so the reads page on (updated_at, namespace, key), newest key first
    await store.abatch(
        [PutOp(("many",), f"k{i:03}", {"i": i, "hit": i % 50 == 0}) for i in range(450)]
    )
    found = await store.asearch(("many",), filter={"hit": True}, limit=20)
    assert keys(found) == [f"k{i:03}" for i in range(400, -1, -50)]
    found = await store.asearch(("many",), filter={"hit": True}, limit=3, offset=7)
    assert keys(found) == ["k050", "k000"]


# -- namespaces -------------------------------------------------------------------------


async def test_list_namespaces(store: ContextEngineStore) -> None:
    for namespace in [
        ("a", "b", "c"),
        ("a", "b", "d", "e"),
        ("a", "b", "d", "i"),
        ("a", "b", "f"),
        ("a", "c", "f"),
        ("ab",),
        ("x", "v1"),
    ]:
        await store.aput(namespace, "k", {"v": 1})
    every = await store.alist_namespaces()
    assert every == sorted(every) and len(every) == 7
    assert await store.alist_namespaces(prefix=("a", "b"), max_depth=3) == [
        ("a", "b", "c"),
        ("a", "b", "d"),
        ("a", "b", "f"),
    ]
    assert await store.alist_namespaces(prefix=("a",)) == [
        ("a", "b", "c"),
        ("a", "b", "d", "e"),
        ("a", "b", "d", "i"),
        ("a", "b", "f"),
        ("a", "c", "f"),
    ]
    assert await store.alist_namespaces(suffix=("f",)) == [("a", "b", "f"), ("a", "c", "f")]
    assert await store.alist_namespaces(prefix=("a", "*", "f")) == [
        ("a", "b", "f"),
        ("a", "c", "f"),
    ]
    assert await store.alist_namespaces(suffix=("d", "*")) == [
        ("a", "b", "d", "e"),
        ("a", "b", "d", "i"),
    ]
    assert await store.alist_namespaces(prefix=("a",), suffix=("e",)) == [("a", "b", "d", "e")]
    assert await store.alist_namespaces(max_depth=1) == [("a",), ("ab",), ("x",)]
    assert await store.alist_namespaces(max_depth=1, limit=1, offset=1) == [("ab",)]
    # a namespace whose items are all gone is gone
    await store.adelete(("ab",), "k")
    assert await store.alist_namespaces(max_depth=1) == [("a",), ("x",)]


# -- semantic search --------------------------------------------------------------------


async def test_semantic_search_ranks_by_meaning(
    indexed: ContextEngineStore, eng: ContextEngine
) -> None:
    await indexed.aput(("mem", "u1"), "pizza", {"text": "I love pizza with cheese", "n": 1})
    await indexed.aput(("mem", "u1"), "dogs", {"text": "dogs are loyal animals", "n": 2})
    await indexed.aput(("mem", "u2"), "pasta", {"text": "pasta with cheese and pizza", "n": 3})
    await indexed.aput(("mem", "u2"), "plain", {"text": "pizza", "n": 4}, index=False)
    await indexed.aput(("mem", "u2"), "none", {"other": "pizza"})  # no "text" field

    hits = await indexed.asearch(("mem",), query="I love pizza with cheese")
    assert keys(hits) == ["pizza", "pasta", "dogs"]  # indexed items only
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    scores = [hit.score for hit in hits]
    assert all(s is not None for s in scores)
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    assert 0 < scores[0] <= 1  # type: ignore[operator]

    assert keys(await indexed.asearch(("mem", "u2"), query="pizza")) == ["pasta"]
    assert keys(await indexed.asearch(("mem",), query="pizza", filter={"n": 2})) == ["dogs"]
    query = "I love pizza with cheese"
    assert keys(await indexed.asearch(("mem",), query=query, limit=1, offset=1)) == ["pasta"]
    assert keys(await indexed.asearch(("nothing",), query="pizza")) == []
    # a search without a query lists every item, indexed or not
    assert len(await indexed.asearch(("mem",))) == 5

    # one semantic memory per indexed text, naming its item
    stored = await vector_rows(eng)
    assert [(t, m["namespace"], m["key"]) for t, m in stored] == [
        ("I love pizza with cheese", "mem.u1", "pizza"),
        ("dogs are loyal animals", "mem.u1", "dogs"),
        ("pasta with cheese and pizza", "mem.u2", "pasta"),
    ]
    # an update replaces the item's vectors, a delete removes them
    await indexed.aput(("mem", "u1"), "pizza", {"text": "sushi and rice"})
    await indexed.adelete(("mem", "u1"), "dogs")
    assert [t for t, _ in await vector_rows(eng)] == [
        "pasta with cheese and pizza",
        "sushi and rice",
    ]
    assert keys(await indexed.asearch(("mem",), query="sushi")) == ["pizza", "pasta"]


async def test_several_fields_and_texts_per_item(eng: ContextEngine) -> None:
    index: Any = {"dims": 64, "embed": HashingEmbedder(64), "fields": ["title", "notes[*]"]}
    store = ContextEngineStore(eng, index=index)
    await store.aput(
        ("kb",),
        "doc",
        {"title": "gardening", "notes": ["tomatoes need sun", "water the basil"]},
    )
    await store.aput(("kb",), "other", {"title": "taxes and forms", "notes": []})
    assert sorted(t for t, _ in await vector_rows(eng)) == [
        "gardening",
        "taxes and forms",
        "tomatoes need sun",
        "water the basil",
    ]
    # an item scores by its best text, and appears once
    hits = await store.asearch(("kb",), query="water the basil")
    assert keys(hits) == ["doc", "other"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    # index= on the put names the fields of this item
    await store.aput(("kb",), "doc", {"title": "gardening", "body": "compost"}, index=["body"])
    assert sorted(t for t, _ in await vector_rows(eng)) == ["compost", "taxes and forms"]


async def test_langgraph_style_embedding_functions(eng: ContextEngine) -> None:
    hashing = HashingEmbedder(32)

    def embed(texts: list[str]) -> list[list[float]]:  # a plain sync function
        return [hashing.vector(t) for t in texts]

    store = ContextEngineStore(eng, index={"dims": 32, "embed": embed})  # fields: the whole value
    await store.aput(("e",), "a", {"food": "apples and pears"})
    await store.aput(("e",), "b", {"car": "a red truck"})
    assert keys(await store.asearch(("e",), query="red truck")) == ["b", "a"]

    # a LangChain Embeddings object (aembed_documents / aembed_query)
    fake = ContextEngineStore(eng, index={"dims": 32, "embed": DeterministicFakeEmbedding(size=32)})
    await fake.aput(("fake",), "a", {"text": "one"})
    await fake.aput(("fake",), "b", {"text": "two"})
    hits = await fake.asearch(("fake",), query='{"text": "two"}')  # the whole value, as JSON
    assert keys(hits)[0] == "b" and hits[0].score == pytest.approx(1.0, abs=1e-5)

    async def wrong(texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]  # not 32 dimensions

    broken = ContextEngineStore(eng, index={"dims": 32, "embed": wrong})
    with pytest.raises(ValidationError):
        await broken.aput(("e",), "c", {"x": "y"})
    assert await store.aget(("e",), "c") is None
    with pytest.raises(ValueError, match="dims"):
        ContextEngineStore(eng, index={"dims": 16, "embed": FunctionEmbedder(wrong, 32)})


async def test_ttl_expires_an_items_vectors_too(
    indexed: ContextEngineStore, eng: ContextEngine, clock: FakeClock
) -> None:
    await indexed.aput(("t",), "k", {"text": "short lived"}, ttl=1)
    clock.advance(50)
    assert keys(await indexed.asearch(("t",), query="short lived")) == ["k"]  # refreshed
    clock.advance(50)
    assert keys(await indexed.asearch(("t",), query="short lived")) == ["k"]
    clock.advance(61)
    assert await indexed.asearch(("t",), query="short lived") == []
    assert await eng._runtime().memory.sweep() == 2  # the item and its vector
    assert await vector_rows(eng) == [] and await item_rows(eng) == []


@pytest.fixture
async def pg_vector_url(pgvector_cluster: Cluster) -> AsyncIterator[str]:  # noqa: F811
    """A fresh migrated database on the PostgreSQL with pgvector, with an HNSW index
    for 64 dimensions."""
    admin = await asyncpg.connect(pgvector_cluster.url(driver="postgresql"), timeout=10)
    name = f"ctx_lgs_{os.getpid()}_{id(admin) % 100000}"
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await ContextEngine(pgvector_cluster.url(name), settings=SETTINGS).migrate()
        conn = await asyncpg.connect(pgvector_cluster.url(name, driver="postgresql"))
        await conn.execute(
            "CREATE INDEX ix_ctx_memories_hnsw_64 ON ctx_memories USING hnsw "
            "((embedding_vector::vector(64)) vector_cosine_ops) WHERE dimensions = 64"
        )
        await conn.close()
        yield pgvector_cluster.url(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_semantic_search_through_pgvectors_index(pg_vector_url: str) -> None:
    """With an HNSW index the nearest come from the index, filtered to the prefix
    during the scan; the best match is found, scored exactly."""
    async with ContextEngine(pg_vector_url, settings=SETTINGS) as engine:
        store = ContextEngineStore(engine, index=INDEX)
        for space in ("a", "b"):
            await store.abatch(
                [
                    PutOp((space, "x"), f"k{i}", {"text": f"{space} note {i} w{i * 7}"})
                    for i in range(90)
                ]
            )
        assert (await engine._store.backend.vector_search(None)).indexed == {64}  # type: ignore[arg-type]
        hits = await store.asearch(("a",), query="a note 42 w294", limit=5)
        assert len(hits) == 5 and all(h.namespace == ("a", "x") for h in hits)
        assert hits[0].key == "k42" and hits[0].score == pytest.approx(1.0, abs=1e-5)
        hits = await store.asearch(("b", "x"), query="a note 42 w294", limit=3, offset=1)
        assert len(hits) == 3 and all(h.namespace == ("b", "x") for h in hits)
        assert engine._store.connections_in_use() == 0
    conn = await asyncpg.connect(pg_vector_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        for _ in range(100):  # statistics reach the view once flushed
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            scans = await conn.fetchval(
                "SELECT idx_scan FROM pg_stat_user_indexes "
                "WHERE indexrelname = 'ix_ctx_memories_hnsw_64'"
            )
            if scans:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert scans and scans >= 1


# -- tenants and processes --------------------------------------------------------------


async def test_tenants_are_isolated(eng: ContextEngine) -> None:
    acme = ContextEngineStore(eng.tenant("acme"), index=INDEX)
    globex = ContextEngineStore(eng.tenant("globex"), index=INDEX)
    await acme.aput(("mem",), "k", {"text": "acme secret plans"})
    await globex.aput(("mem",), "k", {"text": "globex secret plans"})
    await globex.aput(("globex-only",), "k", {"text": "x"})
    got = await acme.aget(("mem",), "k")
    assert got is not None and got.value == {"text": "acme secret plans"}
    assert [h.value["text"] for h in await acme.asearch((), query="secret plans")] == [
        "acme secret plans"
    ]
    assert await acme.alist_namespaces() == [("mem",)]
    await acme.adelete(("mem",), "k")
    assert await globex.aget(("mem",), "k") is not None
    assert len(await vector_rows(eng)) == 2  # globex's


async def test_processes_writing_one_key_leave_the_last_write_whole(
    db_url: str, eng: ContextEngine
) -> None:
    """4 processes put one item 15 times each (a different number of texts each
    time): one row, and the vectors of exactly the value it holds."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        start = time.time() + 3  # the processes start at once, once spawned
        done = pool.starmap(workers.put, [(db_url, w, 15, start) for w in range(4)])
    assert done == [15] * 4
    assert await item_rows(eng) == [("default", "", "shared", "profile")]
    item = await ContextEngineStore(eng).aget(("shared",), "profile")
    assert item is not None and 0 <= item.value["by"] < 4 and 0 <= item.value["round"] < 15
    stored = await vector_rows(eng)
    assert sorted(t for t, _ in stored) == sorted(item.value["notes"])
    assert {m["count"] for _, m in stored} == {len(item.value["notes"])}


# -- a compiled graph -------------------------------------------------------------------


class State(TypedDict):
    said: str
    recalled: list[str]


async def test_a_graphs_nodes_share_memories_across_threads(eng: ContextEngine) -> None:
    """Nodes get the store from LangGraph: each thread remembers what the user said
    and recalls everything the user said in any thread (an async node and a sync
    one, which LangGraph runs in a worker thread)."""

    async def remember(state: State, config: RunnableConfig, *, store: BaseStore) -> dict[str, Any]:
        user = config["configurable"]["user_id"]
        thread = config["configurable"]["thread_id"]
        await store.aput(("memories", user), thread, {"text": state["said"]})
        return {}

    def recall(state: State, config: RunnableConfig, *, store: BaseStore) -> dict[str, Any]:
        user = config["configurable"]["user_id"]
        found = store.search(("memories", user), query=state["said"], limit=10)
        return {"recalled": [item.value["text"] for item in found]}

    builder = StateGraph(State)
    builder.add_node("remember", remember)
    builder.add_node("recall", recall)
    builder.add_edge(START, "remember")
    builder.add_edge("remember", "recall")
    builder.add_edge("recall", END)
    store = ContextEngineStore(eng, index={**INDEX, "fields": ["text"]})
    graph = builder.compile(store=store)

    def config(thread: str, user: str) -> RunnableConfig:
        return {"configurable": {"thread_id": thread, "user_id": user}}

    first = await graph.ainvoke({"said": "my dog is called Rex"}, config("t1", "ann"))
    assert first["recalled"] == ["my dog is called Rex"]
    second = await graph.ainvoke({"said": "what is my dog called"}, config("t2", "ann"))
    assert sorted(second["recalled"]) == ["my dog is called Rex", "what is my dog called"]
    other = await graph.ainvoke({"said": "hello"}, config("t3", "bob"))
    assert other["recalled"] == ["hello"]
    assert await store.alist_namespaces() == [("memories", "ann"), ("memories", "bob")]


def test_the_blocking_facades_store_runs_a_sync_graph(db_url: str) -> None:
    """On ``ctxengine.sync.ContextEngine`` the store's sync methods run on the facade's
    event loop: ``graph.invoke`` with sync nodes, no event loop of the caller's."""

    def note(state: State, config: RunnableConfig, *, store: BaseStore) -> dict[str, Any]:
        store.put(("notes",), config["configurable"]["thread_id"], {"text": state["said"]})
        return {"recalled": [item.value["text"] for item in store.search(("notes",))]}

    builder = StateGraph(State)
    builder.add_node("note", note)
    builder.add_edge(START, "note")
    builder.add_edge("note", END)
    with sync.ContextEngine(db_url, settings=SETTINGS) as engine:
        store = ContextEngineStore(engine.tenant("acme"))
        graph = builder.compile(store=store)
        graph.invoke({"said": "first"}, {"configurable": {"thread_id": "t1"}})
        out = graph.invoke({"said": "second"}, {"configurable": {"thread_id": "t2"}})
        assert sorted(out["recalled"]) == ["first", "second"]
        assert engine.tenant("acme").recall("t1", namespace="notes") == {"text": "first"}
        assert engine.recall("t1", namespace="notes") is None  # tenant "default"
