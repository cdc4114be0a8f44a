"""Key-value memory (SPEC §13): scopes, versions and compare-and-set, TTL and the sweep,
prefix listing with cursors, removal with sessions and users, bad input, and
compare-and-set across OS processes, on SQLite files and PostgreSQL."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, MemoryItem, SessionStatus
from ctxengine.errors import ConflictError, ValidationError
from tests.fixtures import FakeClock

from . import _workers

SETTINGS = EngineSettings(auto_cleanup=False)


async def rows(engine: ContextEngine, sql: str, **params: Any) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def stored(engine: ContextEngine) -> list[tuple[str, str, str, str, str, int]]:
    """Every row of the memory table: (tenant, user, session, namespace, key, version)."""
    found = await rows(
        engine,
        "SELECT tenant_id, user_id, session_id, namespace, key, version "
        "FROM ctx_memory_items ORDER BY tenant_id, user_id, session_id, namespace, key",
    )
    return [tuple(row) for row in found]


async def test_round_trip_and_versions(engine: ContextEngine) -> None:
    first = await engine.remember("lang", "fr", user_id="ann")
    assert isinstance(first, MemoryItem)
    assert (first.key, first.value, first.version) == ("lang", "fr", 1)
    assert (first.user_id, first.session_id, first.namespace) == ("ann", None, "default")
    assert first.expires_at is None and first.created_at == first.updated_at
    assert await engine.recall("lang", user_id="ann") == "fr"
    second = await engine.remember("lang", {"code": "de", "tags": [1, 2.5, True]}, user_id="ann")
    assert second.version == 2 and second.created_at == first.created_at
    assert await engine.recall("lang", user_id="ann") == {"code": "de", "tags": [1, 2.5, True]}
    assert await engine.get_memory("lang", user_id="ann") == second
    for value in (0, "", [], {}, False, 1.5, ["a", {"b": None}]):  # any JSON but null
        assert (await engine.remember("v", value)).value == value
        assert await engine.recall("v") == value
    assert (await engine.get_memory("v")).version == 7  # type: ignore[union-attr]
    assert await engine.recall("missing", user_id="ann") is None
    assert await engine.forget("lang", user_id="ann") is True
    assert await engine.forget("lang", user_id="ann") is False
    assert await engine.recall("lang", user_id="ann") is None
    again = await engine.remember("lang", "en", user_id="ann")
    assert again.version == 1  # a forgotten item starts over


async def test_compare_and_set(engine: ContextEngine) -> None:
    created = await engine.remember("plan", ["a"], user_id="u", expected_version=0)
    assert created.version == 1
    with pytest.raises(ConflictError) as lost:  # 0 = must not exist
        await engine.remember("plan", ["b"], user_id="u", expected_version=0)
    assert (lost.value.expected, lost.value.actual) == (0, 1)
    assert "plan" in lost.value.key
    with pytest.raises(ConflictError) as stale:
        await engine.remember("plan", ["b"], user_id="u", expected_version=2)
    assert (stale.value.expected, stale.value.actual) == (2, 1)
    assert await engine.recall("plan", user_id="u") == ["a"]  # nothing was written
    updated = await engine.remember("plan", ["a", "b"], user_id="u", expected_version=1)
    assert updated.version == 2 and updated.created_at == created.created_at
    with pytest.raises(ConflictError) as absent:  # a version of something that is not there
        await engine.remember("other", 1, user_id="u", expected_version=1)
    assert absent.value.actual == 0
    assert await engine.recall("other", user_id="u") is None
    # the same key in another scope is another item
    assert (await engine.remember("plan", 1, expected_version=0)).version == 1
    assert await stored(engine) == [
        ("default", "", "", "default", "plan", 1),
        ("default", "u", "", "default", "plan", 2),
    ]


async def test_ttl_and_the_sweep(db_url: str, clock: FakeClock) -> None:
    async with ContextEngine(db_url, settings=SETTINGS, clock=clock) as engine:
        item = await engine.remember("short", "x", user_id="u", ttl=10)
        assert item.expires_at == clock.now + timedelta(seconds=10)
        await engine.remember("forever", "y", user_id="u")
        await engine.remember("long", "z", user_id="u", ttl=3600)
        await engine.remember("tenant-wide", "t", ttl=5)
        clock.advance(9.5)
        assert await engine.recall("short", user_id="u") == "x"
        clock.advance(0.5)  # expires_at reached: gone for every call
        assert await engine.recall("short", user_id="u") is None
        assert await engine.get_memory("short", user_id="u") is None
        assert [m.key for m in await engine.list_memories(user_id="u")] == ["forever", "long"]
        assert await engine.forget("short", user_id="u") is False
        with pytest.raises(ConflictError) as lost:  # expired = absent for a compare-and-set
            await engine.remember("short", "x2", user_id="u", expected_version=1)
        assert lost.value.actual == 0
        # still stored until the sweep
        assert len(await stored(engine)) == 4
        assert await engine._runtime().memory.sweep() == 2  # short and tenant-wide
        assert [r[4] for r in await stored(engine)] == ["forever", "long"]
        # expected_version=0 on an expired key succeeds and starts over at 1
        await engine.remember("again", 1, user_id="u", ttl=1)
        await engine.remember("again", 2, user_id="u", ttl=1)
        clock.advance(1)
        restarted = await engine.remember("again", 3, user_id="u", expected_version=0)
        assert restarted.version == 1 and restarted.expires_at is None
        assert restarted.created_at == clock.now
        # a write sets the TTL anew (None: never expires)
        await engine.remember("long", "z2", user_id="u")
        clock.advance(7200)
        assert await engine.recall("long", user_id="u") == "z2"
        assert await engine._runtime().memory.sweep() == 0


async def test_the_cleanup_task_deletes_expired_items_in_batches(
    db_url: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("ctxengine.services.memory._SWEEP_BATCH", 3)
    async with ContextEngine(db_url, settings=SETTINGS, clock=clock) as engine:
        for i in range(8):
            await engine.remember(f"k{i}", i, user_id="u", ttl=1 + i % 2)
        await engine.tenant("other").remember("k", 1, ttl=1)
        await engine.remember("kept", 1, user_id="u", ttl=100)
        clock.advance(2)
        await engine._sweep()  # what the background task runs
        left = await stored(engine)
        assert left == [("default", "u", "", "default", "kept", 1)]


async def test_prefix_listing_pages_with_cursors(engine: ContextEngine) -> None:
    keys = [f"note:{i:03d}" for i in range(25)] + ["other", "note", "nota:1", "Note:1"]
    for key in keys:
        await engine.remember(key, key, user_id="u")
    await engine.remember("note:x", "elsewhere", user_id="v")
    await engine.remember("note:y", "another namespace", user_id="u", namespace="ns")
    pages: list[list[str]] = []
    cursor = None
    added = 0
    while True:
        page = await engine.list_memories(user_id="u", prefix="note:", limit=10, cursor=cursor)
        pages.append([m.key for m in page])
        if len(page) < 10:
            break
        cursor = page[-1].key
        # items added meanwhile: after the cursor they show up, before it they do not
        await engine.remember(f"note:{100 + added}", 0, user_id="u")
        await engine.remember(f"note:!{added}", 0, user_id="u")  # sorts first
        added += 1
    seen = [key for page in pages for key in page]
    expected = sorted(
        [f"note:{i:03d}" for i in range(25)] + [f"note:{100 + i}" for i in range(added)]
    )
    assert seen == expected  # no duplicates, no misses, key order
    assert [len(p) for p in pages][:-1] == [10] * (len(pages) - 1)
    everything = [m.key for m in await engine.list_memories(user_id="u", limit=1000)]
    assert everything == sorted(everything)  # code point order: "N" < "n", "!" < "0"
    assert everything[:2] == ["Note:1", "nota:1"]
    assert [m.key for m in await engine.list_memories(user_id="u", prefix="note")][:2] == [
        "note",
        "note:!0",
    ]
    assert await engine.list_memories(user_id="u", prefix="NOTE") == []  # case matters
    assert [m.value for m in await engine.list_memories(user_id="u", namespace="ns")] == [
        "another namespace"
    ]
    # a cursor past the end, and a cursor that is no key at all, are positions
    assert await engine.list_memories(user_id="u", cursor="zzz") == []
    after = await engine.list_memories(user_id="u", prefix="note:", cursor="note:0125", limit=3)
    assert [m.key for m in after] == [k for k in expected if k > "note:0125"][:3]


async def test_a_prefix_range_holds_every_key_that_starts_with_it(engine: ContextEngine) -> None:
    """Listing by prefix reads one range of keys: keys of the largest code points and
    of the longest length after the prefix are in it, the next key after it is not."""
    longest = "a" + "\U0010ffff" * 254  # 255 characters, the most a key may have
    inside = ["a", "a\U0001f600", "a\U0010ffff", "a\U0010ffffz", longest, "a\x01"]
    outside = ["b", "`", "A", "\U0001f600"]
    for key in inside + outside:
        await engine.remember(key, 1, user_id="u")
    listed = [m.key for m in await engine.list_memories(user_id="u", prefix="a")]
    assert listed == sorted(inside)
    assert [m.key for m in await engine.list_memories(user_id="u", prefix=longest)] == [longest]


async def test_scopes_are_exact_and_tenants_isolated(engine: ContextEngine) -> None:
    other = engine.tenant("acme")
    await engine.remember("k", "tenant-wide")
    await engine.remember("k", "ann", user_id="ann")
    await engine.remember("k", "ann in s1", user_id="ann", session_id="s1")
    await engine.remember("k", "ann in agent ns", user_id="ann", namespace="agent")
    await engine.remember("k", "bob", user_id="bob")
    await other.remember("k", "acme ann", user_id="ann")
    assert await engine.recall("k") == "tenant-wide"
    assert await engine.recall("k", user_id="ann") == "ann"
    assert await engine.recall("k", user_id="ann", session_id="s1") == "ann in s1"
    assert await engine.recall("k", user_id="ann", session_id="s2") is None
    assert await engine.recall("k", user_id="ann", namespace="agent") == "ann in agent ns"
    assert await engine.recall("k", user_id="bob") == "bob"
    assert await other.recall("k", user_id="ann") == "acme ann"
    assert await other.recall("k") is None
    assert await other.recall("k", user_id="bob") is None
    listed = await engine.list_memories(user_id="ann", session_id="s1")
    assert [(m.value, m.user_id, m.session_id) for m in listed] == [("ann in s1", "ann", "s1")]
    assert [m.value for m in await engine.list_memories()] == ["tenant-wide"]
    assert [m.value for m in await other.list_memories(user_id="ann")] == ["acme ann"]
    assert await other.forget("k", user_id="bob") is False
    assert await other.forget_user("ann") == 1
    assert await engine.recall("k", user_id="ann") == "ann"  # the default tenant's stays


async def test_forget_user_removes_exactly_the_users_items(engine: ContextEngine) -> None:
    await engine.remember("a", 1, user_id="ann")
    await engine.remember("b", 1, user_id="ann", namespace="agent")
    await engine.remember("c", 1, user_id="ann", session_id="s1")
    await engine.remember("a", 1, user_id="annie")
    await engine.remember("a", 1)
    await engine.tenant("acme").remember("a", 1, user_id="ann")
    assert await engine.forget_user("ann") == 3
    assert await engine.forget_user("ann") == 0
    assert await stored(engine) == [
        ("acme", "ann", "", "default", "a", 1),
        ("default", "", "", "default", "a", 1),
        ("default", "annie", "", "default", "a", 1),
    ]


async def test_deleting_and_purging_sessions_removes_their_items(
    db_url: str, clock: FakeClock
) -> None:
    async with ContextEngine(db_url, settings=SETTINGS, clock=clock) as engine:
        for sid in ("s1", "s2", "s3"):
            await engine.create_session(sid, "ann")
            await engine.remember("k", sid, user_id="ann", session_id=sid)
        await engine.remember("k", "ann", user_id="ann")  # not narrowed: outlives sessions
        await engine.remember("k", "ann in s9", user_id="ann", session_id="s9")  # no session
        acme = engine.tenant("acme")
        await acme.create_session("s1", "ann")
        await acme.remember("k", "acme s1", user_id="ann", session_id="s1")
        assert await engine.delete_session("s1") is True
        assert await engine.recall("k", user_id="ann", session_id="s1") is None
        assert await acme.recall("k", user_id="ann", session_id="s1") == "acme s1"
        await engine.end_session("s2", SessionStatus.COMPLETED)
        clock.advance(10)
        assert await engine.purge_sessions(ended_before=clock.now) == 1  # s2; s3 is active
        assert await stored(engine) == [
            ("acme", "ann", "s1", "default", "k", 1),
            ("default", "ann", "", "default", "k", 1),
            ("default", "ann", "s3", "default", "k", 1),
            ("default", "ann", "s9", "default", "k", 1),
        ]


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ({"key": ""}, "key"),
        ({"key": " "}, "key"),
        ({"key": "x" * 256}, "key"),
        ({"key": 5}, "key"),
        ({"key": "a\x00b"}, "key"),
        ({"value": None}, "value"),
        ({"value": {"n": math.nan}}, "value"),
        ({"value": {1: "int key"}}, "value"),
        ({"value": object()}, "value"),
        ({"value": "x" * 70_000}, "value"),
        ({"namespace": ""}, "namespace"),
        ({"namespace": None}, "namespace"),
        ({"user_id": ""}, "user_id"),
        ({"session_id": "s1", "user_id": None}, "session_id"),  # narrows a user
        ({"ttl": 0}, "ttl"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": math.inf}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"expected_version": -1}, "expected_version"),
        ({"expected_version": 1.0}, "expected_version"),
    ],
)
async def test_bad_input_writes_nothing(
    engine: ContextEngine, call: dict[str, Any], field: str
) -> None:
    args: dict[str, Any] = {"key": "k", "value": {"ok": 1}, "user_id": "u", **call}
    with pytest.raises(ValidationError) as refused:
        await engine.remember(args.pop("key"), args.pop("value"), **args)
    assert refused.value.field == field
    assert await stored(engine) == []


async def test_bad_reads_and_listings_are_refused(engine: ContextEngine) -> None:
    await engine.remember("k", 1, user_id="u")
    with pytest.raises(ValidationError):
        await engine.recall("", user_id="u")
    with pytest.raises(ValidationError):
        await engine.recall("k", session_id="s")
    with pytest.raises(ValidationError):
        await engine.forget("k", user_id="u", namespace="")
    for bad in ({"limit": 0}, {"limit": 1001}, {"prefix": ""}, {"cursor": ""}, {"limit": True}):
        with pytest.raises(ValidationError):
            await engine.list_memories(user_id="u", **bad)
    with pytest.raises(ValidationError):
        await engine.forget_user("")
    assert await engine.recall("k", user_id="u") == 1


async def test_value_size_follows_max_metadata_bytes(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, max_metadata_bytes=64)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.remember("k", "x" * 62)  # 64 bytes as JSON, with its quotes
        with pytest.raises(ValidationError):
            await engine.remember("k", "x" * 63)
        assert await engine.recall("k") == "x" * 62


async def test_values_keep_unicode_and_nesting(engine: ContextEngine) -> None:
    value = {"é": ["ünï", {"deep": [[1], {"x": "🙂"}]}], "n": -1.25e-7}
    await engine.remember("ключ", value, user_id="ユーザー", namespace="名前")
    assert await engine.recall("ключ", user_id="ユーザー", namespace="名前") == value
    raw = await rows(engine, "SELECT value FROM ctx_memory_items")
    document = raw[0][0]
    assert (json.loads(document) if isinstance(document, str) else document) == value


async def test_compare_and_set_across_processes(engine: ContextEngine, db_url: str) -> None:
    """4 processes, 50 rounds each, each writing the version it just read: for every
    version exactly one writer won, and the stored version is the number of wins."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        start = time.time() + 3  # the processes start at once, once spawned
        results = pool.starmap(_workers.race, [(db_url, "counter", w, 50, start) for w in range(4)])
    wins = Counter(version for won in results for version in won)
    total = sum(wins.values())
    assert 50 <= total < 200  # each round someone wins; some lost a race
    assert set(wins) == set(range(1, total + 1))
    assert all(n == 1 for n in wins.values())  # exactly one winner per version
    (row,) = await rows(engine, "SELECT version, value FROM ctx_memory_items WHERE key = 'counter'")
    value = row[1] if not isinstance(row[1], str) else json.loads(row[1])
    assert row[0] == total and value["v"] == total
    assert (await engine.get_memory("counter", user_id="u")).version == total  # type: ignore[union-attr]


def test_times_are_utc() -> None:
    # a MemoryItem is a plain frozen model; its datetimes are aware
    item = MemoryItem(
        key="k",
        value=1,
        version=1,
        created_at=datetime(2030, 1, 1, tzinfo=UTC),
        updated_at=datetime(2030, 1, 1, tzinfo=UTC),
    )
    assert item.user_id is None and item.namespace == "default"
    assert item.to_dict()["created_at"] == "2030-01-01T00:00:00Z"
