"""Sessions: creation, reads, atomic updates, listing, deletion, validation."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine.errors import (
    EngineClosedError,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    ValidationError,
)


async def count_rows(engine: ContextEngine, table: str = "ctx_sessions") -> int:
    async with engine._store.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT COUNT(*) FROM {table}"))).scalar_one())


async def test_create_and_read_back(engine: ContextEngine) -> None:
    created = await engine.create_session(
        "s-1",
        "ada",
        tier="pro",
        metadata={"source": "web"},
        name="first",
        tags=["a", "b"],
        preferences={"lang": "en"},
    )
    assert created.status is SessionStatus.ACTIVE and created.is_active
    assert (created.request_count, created.error_count, created.total_processing_time) == (0, 0, 0)
    assert created.created_at.tzinfo is not None and created.created_at == created.last_activity
    read = await engine.get_session("s-1")
    assert read is not None
    assert read.model_dump(exclude={"observed_at"}) == created.model_dump(exclude={"observed_at"})
    assert read.to_dict()["status"] == "active"
    assert await engine.get_session("missing") is None


async def test_generated_ids_are_unique_and_time_ordered(engine: ContextEngine) -> None:
    ids = [(await engine.create_session(user_id="u")).session_id for _ in range(20)]
    assert len(set(ids)) == 20
    assert ids == sorted(ids)


async def test_any_string_up_to_255_characters_is_an_id(engine: ContextEngine) -> None:
    for sid in ("x" * 255, "ünïcødé / spaces ; 'quotes' \"", "🙂"):
        await engine.create_session(sid, "u")
        assert (await engine.get_session(sid)) is not None


async def test_duplicate_ids_are_refused(engine: ContextEngine) -> None:
    await engine.create_session("dup", "u")
    with pytest.raises(SessionExistsError) as info:
        await engine.create_session("dup", "v")
    assert info.value.session_id == "dup"
    assert (await engine.get_session("dup")).user_id == "u"  # type: ignore[union-attr]


async def test_a_new_session_comes_with_its_chat_and_a_refused_one_writes_nothing(
    engine: ContextEngine,
) -> None:
    # on PostgreSQL both rows go in one statement; a taken id must insert no chat either
    created = await engine.create_session("pair", "u", metadata={"k": 1}, tags=["a"])
    assert [c.chat_id for c in await engine.list_chats("pair")] == ["default"]
    stored = await engine.get_session("pair")
    assert stored is not None
    assert created.model_dump(exclude={"observed_at"}) == stored.model_dump(exclude={"observed_at"})
    sessions, chats = await count_rows(engine), await count_rows(engine, "ctx_chats")
    with pytest.raises(SessionExistsError):
        await engine.create_session("pair", "v")
    assert (await count_rows(engine), await count_rows(engine, "ctx_chats")) == (sessions, chats)


async def test_get_or_create_returns_the_existing_session(engine: ContextEngine) -> None:
    first = await engine.get_or_create_session("g", "u", tier="basic")
    again = await engine.get_or_create_session("g", "someone-else", tier="pro")
    assert again.session_id == first.session_id and again.tier == "basic"
    assert await count_rows(engine) == 1


async def test_update_session_adds_atomically_and_merges_metadata(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", metadata={"a": 1, "keep": True})
    await engine.update_session("s", increment_requests=True, add_processing_time=0.25)
    updated = await engine.update_session(
        "s",
        increment_requests=True,
        add_processing_time=0.5,
        mark_error=True,
        metadata={"a": 2, "b": [1, 2]},
    )
    assert (updated.request_count, updated.error_count) == (2, 1)
    assert updated.total_processing_time == pytest.approx(0.75)
    assert updated.metadata == {"a": 2, "keep": True, "b": [1, 2]}
    assert updated.error_rate == 0.5 and updated.average_processing_time == pytest.approx(0.375)
    touched = await engine.touch("s")
    assert touched.last_activity >= updated.last_activity


@pytest.mark.parametrize(
    "call",
    [
        lambda e: e.create_session("", "u"),
        lambda e: e.create_session("x" * 256, "u"),
        lambda e: e.create_session(123, "u"),
        lambda e: e.create_session("ok", ""),
        lambda e: e.create_session("ok"),
        lambda e: e.create_session("ok", "u", tier="gold"),
        lambda e: e.create_session("ok", "u", metadata={"x": object()}),
        lambda e: e.create_session("ok", "u", metadata={"x": math.nan}),
        lambda e: e.create_session("ok", "u", metadata={"big": "x" * 70_000}),
        lambda e: e.create_session("ok", "u", metadata=[1, 2]),
        lambda e: e.create_session("ok", "u", tags="a"),
        lambda e: e.create_session("ok", "u", expires_at=datetime(2030, 1, 1)),
    ],
)
async def test_bad_input_on_create_writes_nothing(engine: ContextEngine, call: Any) -> None:
    with pytest.raises(ValidationError):
        await call(engine)
    assert await count_rows(engine) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"add_processing_time": -1.0},
        {"add_processing_time": math.nan},
        {"add_processing_time": math.inf},
        {"metadata": {"x": {1, 2}}},
        {"metadata": {"huge": "y" * 70_000}},
    ],
)
async def test_bad_input_on_update_writes_nothing(engine: ContextEngine, kwargs: Any) -> None:
    before = await engine.create_session("s", "u", metadata={"a": 1})
    with pytest.raises(ValidationError):
        await engine.update_session("s", increment_requests=True, **kwargs)
    after = await engine.get_session("s")
    assert after is not None
    assert after.model_dump(exclude={"observed_at"}) == before.model_dump(exclude={"observed_at"})


async def test_metadata_that_would_grow_too_large_is_refused(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, max_metadata_bytes=100)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u", metadata={"a": "x" * 60})
        with pytest.raises(ValidationError):
            await engine.update_session("s", metadata={"b": "y" * 60})
        assert (await engine.get_session("s")).metadata == {"a": "x" * 60}  # type: ignore[union-attr]


async def test_unknown_sessions_raise_not_found(engine: ContextEngine) -> None:
    for call in (
        engine.update_session("nope", increment_requests=True),
        engine.touch("nope"),
        engine.pause_session("nope"),
        engine.resume_session("nope"),
        engine.end_session("nope"),
    ):
        with pytest.raises(SessionNotFoundError):
            await call
    assert await engine.delete_session("nope") is False


async def test_list_filters_cursor_iter_and_count(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=10_000)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        start = clock.now
        for i in range(25):
            await engine.create_session(
                f"s{i:02}",
                "ann" if i % 2 else "bob",
                tier="pro" if i % 5 == 0 else "free",
                tags=["even"] if i % 2 == 0 else ["odd", "x"],
            )
            clock.advance(10)
        await engine.pause_session("s03")
        await engine.end_session("s04")

        newest_first = [s.session_id for s in await engine.list_sessions(limit=100)]
        assert newest_first == [f"s{i:02}" for i in reversed(range(25))]
        assert [s.session_id for s in await engine.list_sessions(user_id="ann", limit=3)] == [
            "s23",
            "s21",
            "s19",
        ]
        assert {s.session_id for s in await engine.list_sessions(status="paused")} == {"s03"}
        assert {s.session_id for s in await engine.list_sessions(tier="pro")} == {
            "s00",
            "s05",
            "s10",
            "s15",
            "s20",
        }
        assert await engine.count_sessions(tags=["odd", "x"]) == 12
        assert await engine.count_sessions(tags=["odd", "even"]) == 0
        after = start + timedelta(seconds=95)
        assert await engine.count_sessions(created_after=after) == 15
        assert await engine.count_sessions(created_before=start + timedelta(seconds=15)) == 2
        # now = start + 250 s: s00..s05 have been idle >= 200 s, but pausing touched s03
        assert await engine.count_sessions(idle_for=200) == 5
        idle = {s.session_id for s in await engine.list_sessions(idle_for=200)}
        assert idle == {"s00", "s01", "s02", "s04", "s05"}
        odd = [s.session_id for s in await engine.list_sessions(tags=["x", "odd"], limit=100)]
        assert odd == [f"s{i:02}" for i in reversed(range(1, 25, 2))]
        ann_pro = engine.list_sessions(user_id="ann", tier="pro", tags=["odd"], created_after=start)
        assert [s.session_id for s in await ann_pro] == ["s15", "s05"]
        # every filter lists what it counts, alone and combined, page after page
        for f in (
            {"tags": ["odd", "even"]},
            {"created_after": after},
            {"created_before": start + timedelta(seconds=15)},
            {"status": "active", "user_id": "bob", "created_before": after, "idle_for": 1},
        ):
            listed = [s.session_id async for s in engine.iter_sessions(limit=3, **f)]
            assert len(listed) == len(set(listed)) == await engine.count_sessions(**f), f

        pages, cursor = [], None
        while True:
            page = await engine.list_sessions(limit=10, cursor=cursor)
            pages.append([s.session_id for s in page])
            if len(page) < 10:
                break
            cursor = page[-1].session_id
            await engine.create_session(f"new-{cursor}", "zed")  # inserts do not shift pages
        assert [len(p) for p in pages] == [10, 10, 5]
        assert [sid for page in pages for sid in page] == newest_first
        assert [s.session_id async for s in engine.iter_sessions(user_id="bob", limit=4)] == [
            f"s{i:02}" for i in reversed(range(0, 25, 2))
        ]
        assert len(await engine.get_user_sessions("zed")) == 2
        with pytest.raises(ValidationError):
            await engine.list_sessions(cursor="no-such-session")
        with pytest.raises(ValidationError):
            await engine.list_sessions(status="sleeping")
        with pytest.raises(ValidationError):
            await engine.list_sessions(limit=0)


async def test_delete_and_purge(engine: ContextEngine) -> None:
    await engine.create_session("keep", "u")
    await engine.create_session("old", "u")
    await engine.create_session("gone", "u")
    await engine.end_session("old", "failed")
    assert await engine.delete_session("gone") is True
    assert await engine.get_session("gone") is None
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await engine.purge_sessions(ended_before=future, statuses=["completed"]) == 0
    assert await engine.purge_sessions(ended_before=future) == 1
    assert [s.session_id for s in await engine.list_sessions()] == ["keep"]
    with pytest.raises(ValidationError):
        await engine.purge_sessions(ended_before=future, statuses=["active"])


async def test_session_limits(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, max_sessions_per_user=2, max_active_sessions=3)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("a1", "a")
        await engine.create_session("a2", "a")
        with pytest.raises(SessionLimitError) as info:
            await engine.create_session("a3", "a")
        assert (info.value.limit_name, info.value.limit) == ("max_sessions_per_user", 2)
        await engine.create_session("b1", "b")
        with pytest.raises(SessionLimitError) as info:
            await engine.create_session("c1", "c")
        assert info.value.limit_name == "max_active_sessions"
        await engine.pause_session("a1")  # paused sessions still count
        with pytest.raises(SessionLimitError):
            await engine.create_session("c1", "c")
        await engine.end_session("a1")  # ended ones do not
        await engine.create_session("c1", "c")
        assert await engine.count_sessions() == 4
        assert (await engine.get_or_create_session("a2", "a")).session_id == "a2"


async def test_statistics_health_and_metrics(engine: ContextEngine) -> None:
    await engine.create_session("s1", "ann")
    await engine.create_session("s2", "ann")
    await engine.create_session("s3", "bob")
    await engine.update_session("s1", increment_requests=True, add_processing_time=1.0)
    await engine.update_session(
        "s1", increment_requests=True, mark_error=True, add_processing_time=3.0
    )
    await engine.end_session("s3", "failed")
    stats = await engine.get_statistics()
    assert stats.total_sessions == 3 and stats.active_sessions == 2
    assert stats.sessions_by_status["failed"] == 1 and stats.sessions_by_status["expired"] == 0
    assert (stats.total_users, stats.average_sessions_per_user) == (2, 1.5)
    assert (stats.total_requests, stats.total_errors, stats.error_rate) == (2, 1, 0.5)
    assert stats.average_processing_time == pytest.approx(2.0)
    assert (await engine.get_metrics())["total_sessions"] == 3
    health = await engine.health_check()
    assert health["status"] == "healthy" and health["schema_revision"]
    assert health["backend"] in ("sqlite", "postgresql") and health["latency_ms"] >= 0


async def test_engine_lifecycle(db_url: str) -> None:
    engine = ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False))
    with pytest.raises(EngineClosedError):
        await engine.get_session("x")
    await engine.initialize()
    await engine.initialize()  # again: nothing happens
    await engine.create_session("x", "u")
    await engine.close()
    await engine.close()  # twice is fine
    with pytest.raises(EngineClosedError):
        await engine.create_session("y", "u")
    with pytest.raises(EngineClosedError):
        await engine.initialize()
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as again:
        assert await again.get_session("y") is None


async def test_urls_and_the_embedded_default(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CTXENGINE_DATABASE_URL", raising=False)
    async with ContextEngine(settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("d", "u")
    assert (tmp_path / "ctxengine.db").exists()
    monkeypatch.setenv("CTXENGINE_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    async with ContextEngine(settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("e", "u")
    assert (tmp_path / "env.db").exists()
    memory = "sqlite+aiosqlite:///:memory:"
    async with ContextEngine(memory, settings=EngineSettings(auto_cleanup=False)) as engine:
        await engine.create_session("m", "u")
        await engine.update_session("m", increment_requests=True)
        assert (await engine.get_session("m")).request_count == 1  # type: ignore[union-attr]
    for refused in ("mysql://localhost/db", "sqlite://", "postgresql://"):
        with pytest.raises(ValidationError):
            ContextEngine(refused)


async def test_settings_from_the_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("CTXENGINE_SESSION_TIMEOUT", "42")
    monkeypatch.setenv("CTXENGINE_MAX_SESSIONS_PER_USER", "3")
    monkeypatch.setenv("CTXENGINE_AUTO_CLEANUP", "false")
    settings = EngineSettings()
    assert (settings.session_timeout, settings.max_sessions_per_user) == (42, 3)
    assert settings.auto_cleanup is False
    with pytest.raises(Exception, match="session_timeout"):
        EngineSettings(session_timeout=-1)
