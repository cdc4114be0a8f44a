"""Semantic memory beyond one call (SPEC §13): idempotent sources, memorize_session,
retention by max_memories_per_user, and a namespace's dimension settled once, with
several OS processes where it matters, on SQLite files and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import FunctionEmbedder, HashingEmbedder
from ctxengine.errors import SessionNotFoundError, ValidationError
from ctxengine.models import Event
from tests.fixtures import FakeClock
from tests.memory import _workers

HASHING = EngineSettings(auto_cleanup=False, embedder=HashingEmbedder(32))


async def rows(engine: ContextEngine, sql: str, **params: Any) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def stored(engine: ContextEngine) -> int:
    ((count,),) = await rows(engine, "SELECT COUNT(*) FROM ctx_memories")
    return int(count)


@pytest.fixture
async def mem(db_url: str, clock: FakeClock) -> AsyncIterator[ContextEngine]:
    async with ContextEngine(db_url, settings=HASHING, clock=clock) as engine:
        yield engine


def capped(keep: int) -> EngineSettings:
    return EngineSettings(
        auto_cleanup=False, embedder=HashingEmbedder(32), max_memories_per_user=keep
    )


# -- sources ----------------------------------------------------------------------------
async def test_a_source_is_stored_once(mem: ContextEngine) -> None:
    seen: list[Event] = []
    mem.subscribe(seen.append, "memory.added")
    first = await mem.add_memory("my flight leaves Tuesday", user_id="ann", source="chat/1")
    again = await mem.add_memory("something else", user_id="bob", source="chat/1")
    assert again == first  # the stored memory, unchanged
    assert first.source == "chat/1"
    assert await stored(mem) == 1
    assert len(seen) == 1
    # another source, or no source, is another memory
    await mem.add_memory("my flight leaves Tuesday", user_id="ann", source="chat/2")
    await mem.add_memory("my flight leaves Tuesday", user_id="ann")
    await mem.add_memory("my flight leaves Tuesday", user_id="ann")
    assert await stored(mem) == 4


async def test_a_stored_source_is_not_embedded_again(db_url: str) -> None:
    embedded: list[str] = []

    async def embed(texts: list[str]) -> list[list[float]]:
        embedded.extend(texts)
        return [[1.0, float(len(t))] for t in texts]

    settings = EngineSettings(auto_cleanup=False, embedder=FunctionEmbedder(embed, 2))
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.add_memory("tea", user_id="ann", source="s")
        await engine.add_memory("tea", user_id="ann", source="s")
        assert embedded == ["tea"]


async def test_sources_are_per_tenant(mem: ContextEngine) -> None:
    ours = await mem.add_memory("tea", user_id="ann", source="s")
    theirs = await mem.tenant("acme").add_memory("coffee", user_id="ann", source="s")
    assert ours.memory_id != theirs.memory_id and theirs.text == "coffee"
    assert await stored(mem) == 2


async def test_an_expired_memory_does_not_hold_its_source(
    mem: ContextEngine, clock: FakeClock
) -> None:
    old = await mem.add_memory("tea", user_id="ann", source="s", ttl=10)
    clock.advance(11)
    new = await mem.add_memory("coffee", user_id="ann", source="s")
    assert new.memory_id != old.memory_id and new.text == "coffee"
    assert await stored(mem) == 1  # the expired row was replaced
    (hit,) = await mem.search_memory("coffee", user_id="ann")
    assert hit.record == new.model_copy(update={"last_accessed_at": clock.now})


@pytest.mark.parametrize("source", ["", "   ", 7, "x" * 2049, "a\x00b"])
async def test_bad_sources_are_refused(mem: ContextEngine, source: Any) -> None:
    with pytest.raises(ValidationError) as info:
        await mem.add_memory("tea", user_id="ann", source=source)
    assert info.value.field == "source"
    assert await stored(mem) == 0


# -- memorize_session -------------------------------------------------------------------
async def _conversation(engine: ContextEngine) -> str:
    session = await engine.create_session("s1", "ann")
    await engine.add_message("s1", "system", "You are a travel agent.")
    await engine.add_message("s1", "user", "My flight to Lisbon leaves on Tuesday.")
    await engine.add_message(
        "s1",
        "assistant",
        {"role": "assistant", "content": [{"type": "output_text", "text": "Noted: Tuesday."}]},
    )
    # an item holding no text (a tool call) is not a memory
    await engine.add_message("s1", "assistant", {"type": "function_call", "call_id": "c1"})
    await engine.create_chat("s1", chat_id="side")
    await engine.add_message("s1", "user", "I prefer aisle seats.", chat_id="side")
    return session.session_id


async def test_memorize_session_stores_each_message_once(mem: ContextEngine) -> None:
    sid = await _conversation(mem)
    memorized = await mem.memorize_session(sid, namespace="travel")
    assert sorted(r.text for r in memorized) == [
        "I prefer aisle seats.",
        "My flight to Lisbon leaves on Tuesday.",
        "Noted: Tuesday.",
    ]
    by_text = {r.text: r for r in memorized}
    flight = by_text["My flight to Lisbon leaves on Tuesday."]
    assert flight.metadata == {
        "source_session": sid,
        "chat_id": "default",
        "seq": 2,
        "role": "user",
    }
    assert (flight.user_id, flight.session_id, flight.namespace) == ("ann", None, "travel")
    assert await mem.memorize_session(sid, namespace="travel") == []  # idempotent
    assert await mem.count_memories(user_id="ann", namespace="travel") == 3
    await mem.add_message(sid, "user", "Back on Friday.")
    (later,) = await mem.memorize_session(sid, namespace="travel")
    assert later.text == "Back on Friday."
    assert await stored(mem) == 4


async def test_memorize_keeps_what_compaction_replaced(mem: ContextEngine) -> None:
    """Messages a summary replaced are still the conversation's: they are memorized,
    the summary (a system message) is not."""
    sid = await _conversation(mem)

    async def summarize(messages: Any) -> str:
        return "they talked about a flight"

    await mem.add_message(sid, "user", "Back on Friday.")
    await mem.compact_history(sid, summarize, keep_last_turns=1)
    texts = sorted(r.text for r in await mem.memorize_session(sid, chat_id="default"))
    assert texts == [
        "Back on Friday.",
        "My flight to Lisbon leaves on Tuesday.",
        "Noted: Tuesday.",
    ]


async def test_text_that_looks_like_deep_json_is_memorized_as_text(mem: ContextEngine) -> None:
    await mem.create_session("s1", "ann")
    deep = "[" * 5000 + " deep thought " + "]" * 5000
    await mem.add_message("s1", "user", deep)
    await mem.add_message("s1", "user", "{not json")
    texts = sorted(r.text for r in await mem.memorize_session("s1"))
    assert texts == sorted([deep, "{not json"])


async def test_memorize_one_chat(mem: ContextEngine) -> None:
    sid = await _conversation(mem)
    (aisle,) = await mem.memorize_session(sid, chat_id="side")
    assert aisle.text == "I prefer aisle seats." and aisle.metadata["chat_id"] == "side"
    assert len(await mem.memorize_session(sid)) == 2  # the default chat's, not again "side"


async def test_memorized_messages_outlive_their_session(mem: ContextEngine) -> None:
    sid = await _conversation(mem)
    await mem.memorize_session(sid)
    assert await mem.delete_session(sid) is True
    hits = await mem.search_memory("My flight to Lisbon leaves on Tuesday.", user_id="ann")
    assert hits[0].record.text == "My flight to Lisbon leaves on Tuesday."
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)


async def test_memorize_an_unknown_session(mem: ContextEngine) -> None:
    with pytest.raises(SessionNotFoundError):
        await mem.memorize_session("nope")
    await mem.create_session("s1", "ann")
    with pytest.raises(SessionNotFoundError):
        await mem.tenant("acme").memorize_session("s1")
    with pytest.raises(ValidationError):
        await mem.memorize_session("s1", namespace="")
    assert await mem.memorize_session("s1") == []
    assert await stored(mem) == 0


async def test_memorize_without_an_embedder(engine: ContextEngine) -> None:
    await engine.create_session("s1", "ann")
    await engine.add_message("s1", "user", "hello")
    with pytest.raises(ValidationError) as info:
        await engine.memorize_session("s1")
    assert info.value.field == "embedder"


async def test_memorize_from_several_processes(mem: ContextEngine, db_url: str) -> None:
    """4 processes memorize one session of 100 messages at once: every message is
    stored exactly once, and the processes' counts add up to it."""
    await mem.create_session("s1", "ann")
    await mem.add_messages(
        "s1", [{"role": "user", "content": f"fact number {i}"} for i in range(100)]
    )
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        start = time.time() + 3
        counts = pool.starmap(_workers.memorize, [(db_url, "s1", start)] * 4)
    assert sum(counts) == 100
    per_source = await rows(
        mem, "SELECT source, COUNT(*) FROM ctx_memories GROUP BY source HAVING COUNT(*) > 1"
    )
    assert per_source == []
    assert await stored(mem) == 100


# -- retention --------------------------------------------------------------------------
async def test_the_cap_evicts_lowest_importance_then_least_recently_accessed(
    db_url: str, clock: FakeClock
) -> None:
    async with ContextEngine(db_url, settings=capped(3), clock=clock) as engine:
        seen: list[Event] = []
        engine.subscribe(seen.append, "memory.deleted")
        low = await engine.add_memory("low", user_id="ann", importance=0.5)
        for name in ("a", "b"):
            clock.advance(1)
            await engine.add_memory(name, user_id="ann")
        clock.advance(1)
        await engine.search_memory("a", user_id="ann", limit=1)  # "a" accessed last
        clock.advance(1)
        await engine.add_memory("c", user_id="ann")  # over the cap: "low" goes
        assert {e.data["memory_id"] for e in seen} == {low.memory_id}
        assert seen[0].data["reason"] == "evicted"
        clock.advance(1)
        await engine.add_memory("d", user_id="ann")  # "b": same importance, accessed longest ago
        names = {r[0] for r in await rows(engine, "SELECT text FROM ctx_memories")}
        assert names == {"a", "c", "d"}
        # another user, the tenant-wide scope and another tenant are not ann's
        for i in range(4):
            await engine.add_memory(f"bob {i}", user_id="bob")
            await engine.add_memory(f"shared {i}")
            await engine.tenant("acme").add_memory(f"acme {i}", user_id="ann")
        assert await engine.count_memories(user_id="bob") == 3
        assert await engine.count_memories() == 4
        assert await engine.tenant("acme").count_memories(user_id="ann") == 3


async def test_the_cap_counts_every_namespace_and_session(db_url: str) -> None:
    async with ContextEngine(db_url, settings=capped(2)) as engine:
        await engine.add_memory("one", user_id="ann", namespace="x", importance=3)
        await engine.add_memory("two", user_id="ann", session_id="s", importance=2)
        await engine.add_memory("three", user_id="ann", namespace="y", importance=1)
        names = {r[0] for r in await rows(engine, "SELECT text FROM ctx_memories")}
        assert names == {"one", "two"}


async def test_the_cap_holds_across_processes(db_url: str) -> None:
    """4 processes of 4 tasks add 15 memories each for one user under a cap of 10,
    counting after every add: no count ever saw more than 10, and the 10 that remain
    are the most important."""
    async with ContextEngine(db_url, settings=capped(10)) as engine:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            start = time.time() + 3
            most = pool.starmap(
                _workers.add_memories, [(db_url, w, 15, 10, start) for w in range(4)]
            )
        assert max(most) == 10
        importances = [r[0] for r in await rows(engine, "SELECT importance FROM ctx_memories")]
        assert sorted(importances) == [14.0] * 10  # 16 writers' last, most important adds


# -- a namespace's dimension ------------------------------------------------------------
async def test_first_writes_of_two_dimensions_at_once(engine: ContextEngine, db_url: str) -> None:
    """4 processes write the first vector of 60 empty namespaces in turn, at once, in 2
    or 3 dimensions: each namespace ends with one dimension, and every write of the
    other was refused."""
    ctx = multiprocessing.get_context("spawn")
    dimensions = [2, 3, 2, 3]
    with ctx.Pool(4) as pool:
        start = time.time() + 3
        outcomes = pool.starmap(
            _workers.first_vectors, [(db_url, d, 60, start) for d in dimensions]
        )
    kept = await rows(engine, "SELECT namespace, dimensions FROM ctx_memories")
    by_space: dict[str, set[int]] = {}
    for namespace, size in kept:
        by_space.setdefault(namespace, set()).add(size)
    assert all(len(sizes) == 1 for sizes in by_space.values()), by_space
    assert len(by_space) == 60
    for space in range(60):
        (size,) = by_space[f"n{space}"]
        expected = ["stored" if d == size else "refused" for d in dimensions]
        assert [outcome[space] for outcome in outcomes] == expected
