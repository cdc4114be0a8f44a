"""Chats and ordered history: defaults, limits, paging, trimming, bad input, removal."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text

from ctxengine import ContextEngine, EngineSettings, SessionStatus
from ctxengine.errors import (
    ChatLimitError,
    ChatNotFoundError,
    HistoryLimitError,
    SessionExpiredError,
    SessionNotActiveError,
    SessionNotFoundError,
    ValidationError,
)
from tests.fixtures import FakeClock

QUIET = {"auto_cleanup": False}


async def rows(engine: ContextEngine, table: str, session_id: str | None = None) -> int:
    sql = f"SELECT count(*) FROM {table}"
    if session_id is not None:
        sql += f" WHERE session_id = '{session_id}'"
    async with engine._store.engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


async def test_a_session_starts_with_its_default_chat(engine: ContextEngine) -> None:
    session = await engine.create_session("s", "u", system_prompt="Be brief.")
    assert session.current_chat_id == "default"
    (chat,) = await engine.list_chats("s")
    assert (chat.chat_id, chat.session_id, chat.message_count) == ("default", "s", 1)
    (prompt,) = await engine.get_messages("s")
    assert (prompt.seq, prompt.role, prompt.content) == (1, "system", "Be brief.")
    bare = await engine.create_session("bare", "u")
    assert await engine.get_messages(bare.session_id) == []


async def test_messages_go_to_the_current_chat_in_order(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    first = await engine.add_message("s", "user", "hi", tokens=2, metadata={"lang": "en"})
    second = await engine.add_conversation_message("s", "assistant", "hello")
    assert (first.seq, second.seq) == (1, 2)
    assert first.tokens == 2 and first.metadata == {"lang": "en"}
    history = await engine.get_conversation_history("s")
    assert [(m.seq, m.role, m.content) for m in history] == [
        (1, "user", "hi"),
        (2, "assistant", "hello"),
    ]
    assert history[0].created_at.tzinfo is not None
    assert await engine.count_messages("s") == 2


async def test_several_chats_switching_and_deleting(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    other = await engine.create_chat("s", "research", system_prompt="Cite sources.", max_messages=5)
    assert other.name == "research" and other.max_messages == 5
    await engine.add_message("s", "user", "in default")
    await engine.add_message("s", "user", "in research", chat_id=other.chat_id)
    session = await engine.switch_chat("s", other.chat_id)
    assert session.current_chat_id == other.chat_id
    await engine.add_message("s", "assistant", "also research")
    assert [m.content for m in await engine.get_messages("s")] == [
        "Cite sources.",
        "in research",
        "also research",
    ]
    assert [m.content for m in await engine.get_messages("s", chat_id="default")] == ["in default"]
    assert [c.chat_id for c in await engine.list_chats("s")] == ["default", other.chat_id]
    assert await engine.get_chat("s", "nope") is None
    assert await engine.delete_chat("s", other.chat_id) is True
    assert await engine.delete_chat("s", other.chat_id) is False
    session = await engine.get_session("s")
    assert session is not None and session.current_chat_id == "default"
    assert await rows(engine, "ctx_messages", "s") == 1
    stats = await engine.get_session_stats("s")
    assert (stats.chat_count, stats.total_messages, stats.is_active) == (1, 1, True)


async def test_deleting_the_last_chat_leaves_no_current_chat(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await engine.delete_chat("s", "default")
    with pytest.raises(ChatNotFoundError) as caught:
        await engine.add_message("s", "user", "where to?")
    assert caught.value.chat_id is None
    assert await engine.list_chats("s") == []
    chat = await engine.create_chat("s", "fresh")
    await engine.switch_chat("s", chat.chat_id)
    assert (await engine.add_message("s", "user", "here")).chat_id == chat.chat_id


async def test_chat_limit_counts_the_default_chat(db_url: str) -> None:
    settings = EngineSettings(**QUIET, max_chats_per_session=2)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await engine.create_chat("s", "second")
        with pytest.raises(ChatLimitError) as caught:
            await engine.create_chat("s", "third")
        assert caught.value.limit == 2
        assert len(await engine.list_chats("s")) == 2
        await engine.delete_chat("s", "default")
        await engine.create_chat("s", "third")


async def test_paging_backwards_with_before_seq(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await engine.add_messages("s", [{"role": "user", "content": f"m{i}"} for i in range(1, 26)])
    last = await engine.get_messages("s", limit=10)
    assert [m.seq for m in last] == list(range(16, 26))
    earlier = await engine.get_messages("s", limit=10, before_seq=last[0].seq)
    assert [m.seq for m in earlier] == list(range(6, 16))
    first = await engine.get_messages("s", limit=10, before_seq=earlier[0].seq)
    assert [m.seq for m in first] == list(range(1, 6))
    everything = await engine.get_messages("s", limit=None)
    assert [m.content for m in everything] == [f"m{i}" for i in range(1, 26)]


async def test_history_reads_what_sqlalchemy_reads(engine: ContextEngine) -> None:
    """Pages are converted from the driver's rows by generated converters: each message
    holds exactly the values SQLAlchemy reads from its row, timestamps in UTC."""
    from ctxengine.storage.schema import messages

    await engine.create_session("s", "u")
    added = await engine.add_messages(
        "s",
        [
            {"role": "user", "content": "plain"},
            {"role": "assistant", "content": "", "metadata": {"k": [1, "ü", None]}, "tokens": 7},
            {"role": "tool", "content": "x" * 500, "metadata": {}, "tokens": 0},
        ],
    )
    async with engine._store.engine.connect() as conn:
        stored = (await conn.execute(select(messages).order_by(messages.c.seq))).mappings().all()
    read = await engine.get_messages("s", limit=None)
    assert read == added
    for message, row in zip(read, stored, strict=True):
        assert message.model_dump() == {k: row[k] for k in message.model_dump()}
        assert message.created_at.utcoffset() == timedelta(0)
    assert [m.seq for m in await engine.get_messages("s", limit=2)] == [2, 3]


@pytest.mark.parametrize("overflow", ["trim", "reject"])
async def test_history_limit(db_url: str, overflow: Any) -> None:
    settings = EngineSettings(**QUIET, max_messages_per_chat=4, history_overflow=overflow)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u", system_prompt="rules")
        for i in range(3):
            await engine.add_message("s", "user", f"m{i}")
        if overflow == "reject":
            with pytest.raises(HistoryLimitError) as caught:
                await engine.add_message("s", "user", "one too many")
            assert caught.value.limit == 4
            assert [m.content for m in await engine.get_messages("s")] == [
                "rules",
                "m0",
                "m1",
                "m2",
            ]
            assert await engine.count_messages("s") == 4
            return
        await engine.add_message("s", "user", "m3")
        await engine.add_message("s", "user", "m4")
        history = await engine.get_messages("s")
        assert [m.content for m in history] == ["rules", "m2", "m3", "m4"]
        assert [m.seq for m in history] == [1, 4, 5, 6]
        assert await engine.count_messages("s") == 4
        assert await rows(engine, "ctx_messages", "s") == 4


async def test_a_chat_that_trimmed_takes_appends_as_before_once_it_has_room(
    db_url: str,
) -> None:
    """After a chat trimmed its history (its appends then skip the combined attempt,
    which would find no room), appends to it once it has room again trim nothing, and
    appends refused for the session's status write nothing."""
    settings = EngineSettings(**QUIET, max_messages_per_chat=3, history_overflow="trim")
    async with ContextEngine(db_url, settings=settings) as engine:
        conversation = engine._runtime().conversation
        await engine.create_session("s", "u")
        for i in range(5):
            await engine.add_message("s", "user", f"m{i}")
        assert [m.content for m in await engine.get_messages("s")] == ["m2", "m3", "m4"]
        assert ("default", "s", None) in conversation._full  # the hint that it is full
        await engine.clear_messages("s")
        await engine.add_messages("s", [{"role": "user", "content": c} for c in ("a", "b")])
        assert [m.content for m in await engine.get_messages("s")] == ["a", "b"]
        assert await engine.count_messages("s") == 2
        assert ("default", "s", None) not in conversation._full
        for c in ("c", "d"):
            await engine.add_message("s", "user", c)
        assert [m.content for m in await engine.get_messages("s")] == ["b", "c", "d"]
        await engine.pause_session("s")
        with pytest.raises(SessionNotActiveError):
            await engine.add_message("s", "user", "paused")
        assert [m.content for m in await engine.get_messages("s")] == ["b", "c", "d"]
        assert await engine.count_messages("s") == 3
        assert await rows(engine, "ctx_messages", "s") == 3


async def test_a_refused_add_message_leaves_the_session_untouched(
    db_url: str, clock: FakeClock
) -> None:
    """Each refusal is found before anything is written: the session's last activity,
    the chat's counters and the messages stay as they were."""
    settings = EngineSettings(**QUIET, max_messages_per_chat=2, history_overflow="reject")
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        await engine.create_session("s", "u")
        await engine.create_session("paused", "u")
        await engine.pause_session("paused")
        await engine.add_messages("s", [{"role": "user", "content": "a"}] * 2)
        before = await engine.get_session("s")
        clock.advance(5)
        refusals: list[tuple[Any, type[Exception]]] = [
            (engine.add_message("s", "user", "no room"), HistoryLimitError),
            (engine.add_messages("s", [{"role": "user", "content": "x"}] * 3), HistoryLimitError),
            (engine.add_message("s", "user", "hi", chat_id="missing"), ChatNotFoundError),
            (engine.add_message("paused", "user", "hi"), SessionNotActiveError),
        ]
        for call, error in refusals:
            with pytest.raises(error):
                await call
        after = await engine.get_session("s")
        assert before is not None and after is not None
        assert after.last_activity == before.last_activity
        assert await engine.count_messages("s") == 2
        assert await rows(engine, "ctx_messages") == 2
        async with engine._store.engine.connect() as conn:
            next_seq = (await conn.execute(text("SELECT next_seq FROM ctx_chats"))).scalars()
            assert sorted(next_seq) == [0, 2]


async def test_several_messages_in_one_call_take_consecutive_seqs(
    engine: ContextEngine,
) -> None:
    seen: list[Any] = []
    engine.subscribe(seen.append, "message.added")
    await engine.create_session("s", "u", system_prompt="rules")
    for size in (1, 3, 8, 9):  # up to 8 in one statement on PostgreSQL, 9 in several
        added = await engine.add_messages(
            "s", [{"role": "user", "content": f"{size}/{i}", "tokens": i} for i in range(size)]
        )
        assert [m.content for m in added] == [f"{size}/{i}" for i in range(size)]
        assert [m.tokens for m in added] == list(range(size))
    history = await engine.get_messages("s", limit=None)
    assert [m.seq for m in history] == list(range(1, 23))
    assert [(e.data["seq"], e.data["chat_id"]) for e in seen] == [
        (seq, "default") for seq in range(2, 23)
    ]
    assert await engine.count_messages("s") == 22


async def test_a_chat_full_of_system_messages_refuses_even_when_trimming(db_url: str) -> None:
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET)) as engine:
        await engine.create_session("s", "u")
        chat = await engine.create_chat("s", system_prompt="only rules", max_messages=1)
        with pytest.raises(HistoryLimitError):
            await engine.add_message("s", "user", "no room", chat_id=chat.chat_id)
        assert [m.content for m in await engine.get_messages("s", chat_id=chat.chat_id)] == [
            "only rules"
        ]


async def test_trim_history_and_clear(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", system_prompt="rules")
    await engine.add_messages(
        "s",
        [{"role": "user", "content": f"m{i}"} for i in range(6)]
        + [{"role": "system", "content": "late rule"}],
    )
    assert await engine.trim_history("s", 2) == 4
    assert [m.content for m in await engine.get_messages("s")] == [
        "rules",
        "m4",
        "m5",
        "late rule",
    ]
    # whole turns only: "late rule" belongs to the turn m5 started, which stays whole
    assert await engine.trim_history("s", 1, keep_system=False) == 2
    assert [m.content for m in await engine.get_messages("s")] == ["m5", "late rule"]
    await engine.add_message("s", "user", "again")
    assert await engine.clear_messages("s", keep_system=True) == 2
    assert await engine.clear_messages("s") == 1
    assert await engine.count_messages("s") == 0
    # sequence numbers are never reused
    assert (await engine.add_message("s", "user", "after")).seq == 10


BAD_MESSAGES: list[tuple[str, Any, dict[str, Any]]] = [
    ("wizard", "hi", {}),
    ("user", "", {}),
    ("system", "", {}),
    ("user", None, {}),
    ("user", "x" * 2000, {}),
    ("user", "nul\x00byte", {}),
    ("user", "lone \ud800 surrogate", {}),
    ("user", "hi", {"metadata": {"when": object()}}),
    ("user", "hi", {"metadata": {"n": float("nan")}}),
    ("user", "hi", {"metadata": {"big": "y" * 300}}),
    ("user", "hi", {"tokens": -1}),
    ("user", "hi", {"tokens": 1.5}),
    ("user", "hi", {"chat_id": ""}),
]


@pytest.mark.parametrize(("role", "content", "extra"), BAD_MESSAGES)
async def test_bad_messages_are_refused_before_writing(
    db_url: str, role: str, content: Any, extra: dict[str, Any]
) -> None:
    settings = EngineSettings(**QUIET, max_message_bytes=1000, max_metadata_bytes=200)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        with pytest.raises(ValidationError):
            await engine.add_message("s", role, content, **extra)
        assert await rows(engine, "ctx_messages") == 0


async def test_empty_content_is_fine_for_assistant_and_tool(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await engine.add_message("s", "assistant", "", metadata={"tool_calls": [{"id": "c1"}]})
    await engine.add_message("s", "tool", "")
    assert await engine.count_messages("s") == 2


async def test_unknown_chats_and_sessions(engine: ContextEngine) -> None:
    await engine.create_session("a", "u")
    b_chat = await engine.create_session("b", "u")
    other = await engine.create_chat(b_chat.session_id, "b's chat")
    for call in (
        engine.add_message("a", "user", "hi", chat_id="missing"),
        engine.add_message("a", "user", "hi", chat_id=other.chat_id),
        engine.get_messages("a", chat_id=other.chat_id),
        engine.switch_chat("a", other.chat_id),
        engine.count_messages("a", chat_id="missing"),
        engine.clear_messages("a", chat_id="missing"),
        engine.trim_history("a", 1, chat_id="missing"),
    ):
        with pytest.raises(ChatNotFoundError):
            await call
    for missing in (
        engine.add_message("nobody", "user", "hi"),
        engine.get_messages("nobody"),
        engine.list_chats("nobody"),
        engine.create_chat("nobody"),
        engine.get_chat("nobody", "default"),
        engine.get_session_stats("nobody"),
    ):
        with pytest.raises(SessionNotFoundError):
            await missing
    assert await rows(engine, "ctx_messages") == 0
    session = await engine.get_session("a")
    assert session is not None and session.current_chat_id == "default"


async def test_conversation_work_needs_an_active_session(db_url: str, clock: FakeClock) -> None:
    settings = EngineSettings(**QUIET, session_timeout=60)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        await engine.create_session("paused", "u")
        await engine.pause_session("paused")
        with pytest.raises(SessionNotActiveError) as caught:
            await engine.add_message("paused", "user", "hi")
        assert caught.value.status == SessionStatus.PAUSED
        with pytest.raises(SessionNotActiveError):
            await engine.create_chat("paused")
        await engine.create_session("idle", "u")
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            await engine.add_message("idle", "user", "hi")
        # reads and tidying still work on sessions that cannot work
        assert await engine.get_messages("idle") == []
        assert await engine.clear_messages("paused") == 0


async def test_message_events_and_statistics(engine: ContextEngine) -> None:
    seen: list[Any] = []
    engine.subscribe(seen.append, "message.added")
    await engine.create_session("s", "u", system_prompt="rules")
    await engine.add_message("s", "user", "hi")
    assert [(e.type, e.session_id, e.data["seq"], e.data["role"]) for e in seen] == [
        ("message.added", "s", 2, "user")
    ]
    assert (await engine.get_statistics()).total_messages == 2


async def test_delete_and_purge_remove_the_conversation(engine: ContextEngine) -> None:
    for sid in ("keep", "drop", "old"):
        await engine.create_session(sid, "u", system_prompt="rules")
        await engine.create_chat(sid, "second")
        await engine.add_message(sid, "user", "hi")
        await engine.checkpoint(sid)
    assert await engine.delete_session("drop") is True
    await engine.end_session("old")
    far_future = (await engine.get_session("keep")).created_at.replace(year=2100)  # type: ignore[union-attr]
    assert await engine.purge_sessions(ended_before=far_future) == 1
    for table in ("ctx_chats", "ctx_messages", "ctx_checkpoints"):
        assert await rows(engine, table, "keep") > 0
        assert await rows(engine, table, "drop") == 0
        assert await rows(engine, table, "old") == 0


async def test_tenants_keep_their_conversations_apart(engine: ContextEngine) -> None:
    acme, globex = engine.tenant("acme"), engine.tenant("globex")
    await acme.create_session("s", "u")
    await globex.create_session("s", "u")
    await acme.add_message("s", "user", "acme secret")
    await acme.set_metadata("s", "owner", "acme")
    assert await globex.get_messages("s") == []
    assert await globex.get_all_metadata("s") == {}
    assert await globex.count_messages("s") == 0
    with pytest.raises(SessionNotFoundError):
        await engine.get_messages("s")
    exported = await acme.export_session("s")
    assert [m["content"] for m in exported["messages"]] == ["acme secret"]
    assert (await globex.get_statistics()).total_messages == 0


BAD_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("create_chat", {"name": 7}),
    ("create_chat", {"max_messages": 0}),
    ("create_chat", {"metadata": {"x": {1, 2}}}),
    ("create_chat", {"system_prompt": ""}),
    ("create_chat", {"chat_id": ""}),
    ("create_chat", {"chat_id": "default"}),
    ("trim_history", {"keep_last": -1}),
    ("get_messages", {"before_seq": -1}),
    ("get_messages", {"limit": 0}),
    ("checkpoint", {"description": None}),
    ("add_messages", {"messages": [{"role": "user"}]}),
    (
        "add_messages",
        {"messages": [{"role": "user", "content": "ok"}, {"role": "x", "content": "y"}]},
    ),
]


@pytest.mark.parametrize(("call", "kwargs"), BAD_CALLS)
async def test_bad_conversation_calls_write_nothing(
    engine: ContextEngine, call: str, kwargs: dict[str, Any]
) -> None:
    await engine.create_session("s", "u")
    before = {t: await rows(engine, t) for t in ("ctx_chats", "ctx_messages", "ctx_checkpoints")}
    with pytest.raises(ValidationError) as caught:
        await getattr(engine, call)("s", **kwargs)
    assert str(caught.value)
    after = {t: await rows(engine, t) for t in before}
    assert after == before
    session = await engine.get_session("s")
    assert session is not None and session.current_chat_id == "default"
