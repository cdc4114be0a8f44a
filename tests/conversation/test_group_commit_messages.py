"""Group commit of add_message/add_messages: concurrent appends share a transaction
(on PostgreSQL one statement), each caller gets exactly its own messages and its own
error, and every chat's seqs stay 1..N in commit order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, Event, Message
from ctxengine.errors import (
    ChatNotFoundError,
    HistoryLimitError,
    SessionNotActiveError,
    SessionNotFoundError,
)
from ctxengine.services.chats import message_values
from ctxengine.services.conversation import ConversationService
from ctxengine.storage.repositories.conversation import Appended
from tests.fixtures import watch_deadlocks

QUIET = {"auto_cleanup": False}
#: Why the races between a batch's reads and its writes are PostgreSQL's only.
SQLITE_LOCKED = (
    "a batch on SQLite holds the write lock: nothing changes between its reads and writes"
)
TENANT = "default"


async def history(engine: ContextEngine, sid: str, chat_id: str | None = None) -> list[Message]:
    return await engine.get_messages(sid, chat_id=chat_id, limit=None)


def check_stored(returned: list[Message], stored: list[Message]) -> None:
    """Each message returned is the stored one with its seq, content and all."""
    by_seq = {m.seq: m for m in stored}
    for message in returned:
        assert by_seq[message.seq] == message


async def test_concurrent_appends_share_statements_and_keep_each_chat_in_order(
    engine: ContextEngine,
) -> None:
    """64 tasks append to one chat and 64 to chats of their own (32 chats of one
    session, 32 sessions): the calls share statements, each chat's seqs are 1..N, and
    each caller gets back the stored row of its own content."""
    await engine.create_session("hot", "u")
    await engine.create_session("many", "u")
    for i in range(32):
        await engine.create_session(f"own-{i}", "u")
        await engine.create_chat("many", chat_id=f"c{i}")

    hot = [engine.add_message("hot", "user", f"hot {i}") for i in range(64)]
    many = [engine.add_message("many", "user", f"many {i}", chat_id=f"c{i}") for i in range(32)]
    own = [engine.add_message(f"own-{i}", "user", f"own {i}", tokens=i) for i in range(32)]
    results = await asyncio.gather(*hot, *many, *own)

    hot_added, rest = results[:64], results[64:]
    assert [m.content for m in hot_added] == [f"hot {i}" for i in range(64)]
    stored = await history(engine, "hot")
    assert [m.seq for m in stored] == list(range(1, 65))
    assert sorted(m.seq for m in hot_added) == list(range(1, 65))
    check_stored(hot_added, stored)
    for i, message in enumerate(rest[:32]):
        assert (message.chat_id, message.seq, message.content) == (f"c{i}", 1, f"many {i}")
        assert await history(engine, "many", f"c{i}") == [message]
    for i, message in enumerate(rest[32:]):
        assert (message.seq, message.content, message.tokens) == (1, f"own {i}", i)
        assert await history(engine, f"own-{i}") == [message]
    # a batch's messages share its transaction's time
    assert len({m.created_at for m in results}) < len(results) // 4
    for sid in ("hot", "many", "own-0"):
        session = await engine.get_session(sid)
        assert session is not None and session.last_activity >= max(
            m.created_at for m in results if m.session_id == sid
        )


async def test_multi_message_calls_keep_their_messages_consecutive(engine: ContextEngine) -> None:
    """add_messages of 3 messages interleaved with single add_message calls on one chat:
    each call's messages are consecutive, in its order; message.added once per message
    with its seq."""
    events: list[Event] = []
    engine.subscribe(events.append, "message.added")
    await engine.create_session("s", "u")

    def three(i: int) -> Any:
        batch = [{"role": "user", "content": f"{i}/{k}"} for k in range(3)]
        return engine.add_messages("s", batch)

    calls = [three(i) if i % 2 else engine.add_message("s", "user", f"{i}") for i in range(40)]
    results = await asyncio.gather(*calls)

    stored = await history(engine, "s")
    assert [m.seq for m in stored] == list(range(1, 20 * 3 + 20 + 1))
    for i, result in enumerate(results):
        added = result if isinstance(result, list) else [result]
        if i % 2:
            assert [m.content for m in added] == [f"{i}/{k}" for k in range(3)]
            first = added[0].seq
            assert [m.seq for m in added] == [first, first + 1, first + 2]
        else:
            assert [m.content for m in added] == [f"{i}"]
        check_stored(added, stored)
    assert sorted(e.data["seq"] for e in events) == list(range(1, 81))
    content_of = {m.seq: m.content for m in stored}
    assert all(e.data["chat_id"] == "default" and e.session_id == "s" for e in events)
    assert {e.data["seq"]: e.data["role"] for e in events} == {m.seq: m.role for m in stored}
    assert len(content_of) == len(events)
    assert len({m.created_at for m in stored}) < len(results)


async def test_a_refused_caller_fails_alone(engine: ContextEngine) -> None:
    """In one batch: an ended session, a missing session and a missing chat each get
    their own error; the calls beside them are written, and nothing for the refused."""
    for name in ("a", "b", "ended"):
        await engine.create_session(name, "u")
    await engine.end_session("ended")

    outcomes = await asyncio.gather(
        *(engine.add_message("a", "user", f"a{i}") for i in range(5)),
        engine.add_message("ended", "user", "no"),
        engine.add_message("missing", "user", "no"),
        engine.add_message("a", "user", "no", chat_id="nowhere"),
        *(engine.add_message("b", "user", f"b{i}") for i in range(5)),
        return_exceptions=True,
    )

    assert isinstance(outcomes[5], SessionNotActiveError)
    assert isinstance(outcomes[6], SessionNotFoundError)
    assert isinstance(outcomes[7], ChatNotFoundError)
    good = outcomes[:5] + outcomes[8:]
    assert all(isinstance(o, Message) for o in good), good
    for name in ("a", "b"):  # (two lone calls may commit in either order)
        stored = await history(engine, name)
        assert sorted(m.content for m in stored) == [f"{name}{i}" for i in range(5)]
        assert [m.seq for m in stored] == [1, 2, 3, 4, 5]
    assert await engine.count_messages("ended") == 0
    assert len({m.created_at for m in good if isinstance(m, Message)}) < len(good)


def conversation(engine: ContextEngine) -> ConversationService:
    return engine._runtime().conversation


async def test_a_batch_admits_each_chats_calls_in_order_while_it_has_room(
    db_url: str,
) -> None:
    """A batch itself: per chat, the calls are admitted in batch order while the chat
    has room; calls of a session that cannot work, or to a missing chat, are not
    written; the seqs of each chat are consecutive in batch order. In one statement
    (PostgreSQL) none after the first call that does not fit is admitted, even one that
    would; call after call in one transaction (SQLite), a later call that fits is."""
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET)) as engine:
        await engine.create_session("s", "u")
        await engine.create_chat("s", chat_id="c", max_messages=5)
        await engine.create_session("ended", "u")
        await engine.end_session("ended")
        service = conversation(engine)
        plan: list[tuple[str, str | None, int]] = [
            ("s", "c", 3),  # fits: 3
            ("s", "c", 1),  # fits: 4
            ("s", None, 2),  # the current chat: 1-2
            ("s", "c", 3),  # 7 > 5: not written
            ("s", "c", 1),  # fits, after one that did not
            ("s", "nowhere", 1),  # a missing chat
            ("ended", None, 1),  # a session that cannot work
            ("missing", None, 1),
            ("s", None, 1),  # 3
        ]

        message = service.new_message("user", "hello")

        async def work(conn: Any, fx: Any) -> list[Appended | None]:
            calls = [
                (chat, [message_values(TENANT, sid, "", 0, message, fx.now) for _ in range(n)])
                for sid, chat, n in plan
            ]
            return await service.repo.append_many(conn, calls, fx.now)

        written = await engine._runtime().ctx.transact(work)
        # one statement admits a prefix of each chat's calls
        prefix = engine._store.backend.data_modifying_ctes
        last = None if prefix else ("c", 5, 5)
        assert [
            None if a is None else (a.chat_id, a.last_seq, a.message_count) for a in written
        ] == [
            ("c", 3, 3),
            ("c", 4, 4),
            ("default", 2, 2),
            None,
            last,
            None,
            None,
            None,
            ("default", 3, 3),
        ]
        limits = [5, 5, 1000, 1000] if prefix else [5, 5, 1000, 5, 1000]
        assert [a.limit for a in written if a is not None] == limits
        in_c = 4 if prefix else 5
        assert [m.seq for m in await history(engine, "s", "c")] == list(range(1, in_c + 1))
        assert [m.seq for m in await history(engine, "s")] == [1, 2, 3]
        assert await engine.count_messages("ended") == 0
        assert await engine.count_messages("s", chat_id="c") == in_c


async def fill(engine: ContextEngine, sid: str, turns: int) -> None:
    for t in range(turns):
        await engine.add_message(sid, "user", f"q{t}")
        await engine.add_message(sid, "assistant", f"a{t}")


async def test_trimming_near_the_cap_keeps_the_history_as_one_call_at_a_time_would(
    db_url: str,
) -> None:
    """A chat near its cap, 24 concurrent turns starting: admitted calls append in
    order, the others trim in the general transaction; the stored history is the
    one the same calls make one after another, and each caller's message is stored."""
    settings = EngineSettings(**QUIET, history_overflow="trim", max_messages_per_chat=20)
    async with ContextEngine(db_url, settings=settings) as engine:
        for sid in ("together", "alone"):
            await engine.create_session(sid, "u")
            await fill(engine, sid, 4)  # 8 of 20
        results = await asyncio.gather(
            *(engine.add_message("together", "user", f"n{i}") for i in range(24))
        )
        for i in range(24):
            await engine.add_message("alone", "user", f"n{i}")

        together, alone = await history(engine, "together"), await history(engine, "alone")
        assert [(m.seq, m.role) for m in together] == [(m.seq, m.role) for m in alone]
        assert [m.seq for m in together] == list(range(13, 33))
        assert sorted(m.seq for m in results) == list(range(9, 33))
        check_stored([m for m in results if m.seq >= 13], together)
        assert await engine.count_messages("together") == 20


async def test_rejecting_near_the_cap_admits_the_calls_that_fit_and_refuses_the_rest(
    db_url: str,
) -> None:
    settings = EngineSettings(**QUIET, history_overflow="reject", max_messages_per_chat=20)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await fill(engine, "s", 4)  # 8 of 20
        outcomes = await asyncio.gather(
            *(engine.add_message("s", "user", f"n{i}") for i in range(24)),
            return_exceptions=True,
        )
        added = [o for o in outcomes if isinstance(o, Message)]
        refused = [o for o in outcomes if isinstance(o, HistoryLimitError)]
        assert len(added) == 12 and len(refused) == 12
        stored = await history(engine, "s")
        assert [m.seq for m in stored] == list(range(1, 21))
        assert sorted(m.seq for m in added) == list(range(9, 21))
        check_stored(added, stored)


async def test_compacting_past_the_cap_appends_every_call_and_asks_for_compaction(
    db_url: str,
) -> None:
    """With "compact" every call appends, past the cap too, each told to compaction."""
    release = asyncio.Event()

    async def summarize(messages: list[Message]) -> str:
        await release.wait()
        return "summary"

    settings = EngineSettings(
        **QUIET,
        history_overflow="compact",
        summarizer=summarize,
        compact_keep_last_turns=1,
        max_messages_per_chat=20,
    )
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await fill(engine, "s", 4)
        assert engine._runtime().context.running == 0
        results = await asyncio.gather(
            *(engine.add_message("s", "user", f"n{i}") for i in range(24))
        )
        stored = await history(engine, "s")
        assert [m.seq for m in stored] == list(range(1, 33))
        assert sorted(m.seq for m in results) == list(range(9, 33))
        check_stored(results, stored)
        assert engine._runtime().context.running == 1  # past the cap: compaction asked
        release.set()
        for _ in range(500):
            if engine._runtime().context.running == 0:
                break
            await asyncio.sleep(0.01)
        assert await engine.count_messages("s") <= 20


async def test_large_content_appends_in_a_statement_of_its_own(engine: ContextEngine) -> None:
    """A call bringing much content is not combined (a batch's document stays small):
    it appends alone, beside the combined calls, and the chat stays in order."""
    await engine.create_session("s", "u")
    large = "x" * 40_000
    outcomes = await asyncio.gather(
        *(engine.add_message("s", "user", large if i % 3 == 0 else f"m{i}") for i in range(24))
    )
    stored = await history(engine, "s")
    assert [m.seq for m in stored] == list(range(1, 25))
    check_stored(outcomes, stored)
    alone = [m for m in outcomes if m.content == large]
    others = {m.created_at for m in outcomes if m.content != large}
    assert len(others) < 16
    assert all(m.created_at not in others for m in alone)
    assert len({m.created_at for m in alone}) == len(alone)


async def test_two_engines_batching_over_many_sessions_never_deadlock(db_url: str) -> None:
    """Two engines (two processes' worth of batches) append to 16 sessions at random:
    every batch locks its sessions, then its chats, each in key order, so no two
    batches wait on each other in a cycle (a deadlock, found after a second, retried),
    and every chat's seqs run 1..N."""
    settings = EngineSettings(**QUIET, max_messages_per_chat=None)
    async with (
        ContextEngine(db_url, settings=settings) as one,
        ContextEngine(db_url, settings=settings) as two,
    ):
        deadlocks = watch_deadlocks(one, two)
        for i in range(16):
            await one.create_session(f"s{i}", "u")

        async def writer(engine: ContextEngine, w: int) -> None:
            for j in range(10):
                await engine.add_message(f"s{(w * 7 + j * 5) % 16}", "user", f"{w}/{j}")

        await asyncio.gather(*(writer(e, w) for w in range(64) for e in (one, two)))
        total = 0
        for i in range(16):
            seqs = [m.seq for m in await history(one, f"s{i}")]
            assert seqs == list(range(1, len(seqs) + 1))
            total += len(seqs)
        assert total == 2 * 64 * 10
    assert deadlocks == []


async def race_with(engine: ContextEngine, change: str, calls: list[Any]) -> list[Any]:
    """Run ``calls`` while another transaction holds ``change`` (SQL) uncommitted: each
    batch reads its snapshot from before it, then waits for the row locks, and finds
    the change committed on the locked rows."""
    async with engine._store.engine.connect() as conn:
        await conn.execute(text(change))
        tasks = [asyncio.ensure_future(call) for call in calls]
        await asyncio.sleep(0.3)  # every call has read its snapshot and waits
        assert not any(task.done() for task in tasks)
        await conn.commit()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_chat_filled_before_its_lock_refuses_the_batch(db_url: str) -> None:
    """The room is checked again on the locked chat row: a batch whose snapshot saw room
    that a concurrent writer took aborts and is retried; the calls are then refused."""
    if not db_url.startswith("postgresql"):
        pytest.skip(SQLITE_LOCKED)
    settings = EngineSettings(**QUIET, history_overflow="reject")
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await fill(engine, "s", 2)
        shrink = "UPDATE ctx_chats SET max_messages = message_count WHERE session_id = 's'"
        calls = [engine.add_message("s", "user", f"n{i}") for i in range(8)]
        outcomes = await race_with(engine, shrink, calls)
        assert all(isinstance(o, HistoryLimitError) for o in outcomes), outcomes
        assert [m.seq for m in await history(engine, "s")] == [1, 2, 3, 4]


async def test_a_session_ended_before_its_lock_refuses_the_batch(db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip(SQLITE_LOCKED)
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET)) as engine:
        await engine.create_session("s", "u")
        end = "UPDATE ctx_sessions SET status = 'completed' WHERE session_id = 's'"
        calls = [engine.add_message("s", "user", f"n{i}") for i in range(8)]
        outcomes = await race_with(engine, end, calls)
        assert all(isinstance(o, SessionNotActiveError) for o in outcomes), outcomes
        assert await engine.count_messages("s") == 0


async def test_a_chat_switched_before_the_lock_takes_the_appends(db_url: str) -> None:
    """Calls to the current chat append to the chat current on the locked session row."""
    if not db_url.startswith("postgresql"):
        pytest.skip(SQLITE_LOCKED)
    async with ContextEngine(db_url, settings=EngineSettings(**QUIET)) as engine:
        await engine.create_session("s", "u")
        await engine.create_chat("s", chat_id="other")
        switch = "UPDATE ctx_sessions SET current_chat_id = 'other' WHERE session_id = 's'"
        calls = [engine.add_message("s", "user", f"n{i}") for i in range(8)]
        outcomes = await race_with(engine, switch, calls)
        assert all(isinstance(o, Message) and o.chat_id == "other" for o in outcomes)
        assert [m.seq for m in await history(engine, "s", "other")] == list(range(1, 9))
        assert await engine.count_messages("s", chat_id="default") == 0
