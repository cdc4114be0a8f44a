"""History order, metadata merges and chat limits under concurrent writers: tasks in one
process and several OS processes, checked in the database afterwards."""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, Message

from . import _workers

UNLIMITED = EngineSettings(auto_cleanup=False, max_messages_per_chat=None)


def pool(processes: int):  # type: ignore[no-untyped-def]
    return multiprocessing.get_context("spawn").Pool(processes)


async def poll_while(
    engine: ContextEngine, session_id: str, writers: Callable[[], Awaitable[Any]]
) -> tuple[Any, list[list[tuple[int, str]]]]:
    """Run ``writers`` while reading the whole history over and over."""
    snapshots: list[list[tuple[int, str]]] = []
    task = asyncio.ensure_future(writers())
    while not task.done():
        messages: list[Message] = await engine.get_messages(session_id, limit=None)
        snapshots.append([(m.seq, m.content) for m in messages])
        await asyncio.sleep(0.005)
    return await task, snapshots


def assert_prefix_extensions(snapshots: list[list[tuple[int, str]]], final: list[Any]) -> None:
    """Every snapshot is a prefix of the next one and of the final history, and the
    sequence numbers run 1..n without gaps."""
    history = [(m.seq, m.content) for m in final]
    assert [seq for seq, _ in history] == list(range(1, len(history) + 1))
    sequence = [*snapshots, history]
    for before, after in itertools.pairwise(sequence):
        assert after[: len(before)] == before


async def stored(engine: ContextEngine, session_id: str) -> list[tuple[int, str]]:
    async with engine._store.engine.connect() as conn:
        result = await conn.execute(
            text("SELECT seq, content FROM ctx_messages WHERE session_id = :s ORDER BY seq"),
            {"s": session_id},
        )
        return [(int(seq), content) for seq, content in result]


async def test_16_concurrent_writers_while_polling(db_url: str) -> None:
    async with ContextEngine(db_url, settings=UNLIMITED) as engine:
        await engine.create_session("s", "u")
        failures: list[BaseException] = []

        async def writer(w: int) -> None:
            for i in range(10):
                try:
                    await engine.add_message("s", "user", f"{w}/{i}")
                except Exception as exc:  # counted, not hidden
                    failures.append(exc)

        async def writers() -> None:
            await asyncio.gather(*(writer(w) for w in range(16)))

        _, snapshots = await poll_while(engine, "s", writers)
        final = await engine.get_messages("s", limit=None)
        assert failures == []
        assert len(final) == 160
        assert len(snapshots) > 1
        assert_prefix_extensions(snapshots, final)
        # each writer's own messages keep its order
        for w in range(16):
            mine = [int(m.content.split("/")[1]) for m in final if m.content.startswith(f"{w}/")]
            assert mine == list(range(10))
        assert await stored(engine, "s") == [(m.seq, m.content) for m in final]
        assert await engine.count_messages("s") == 160


async def test_4_processes_append_while_polling(db_url: str) -> None:
    async with ContextEngine(db_url, settings=UNLIMITED) as engine:
        await engine.create_session("s", "u")
        with pool(4) as workers:
            pending = workers.starmap_async(
                _workers.append, [(db_url, "s", f"p{p}", 4, 10) for p in range(4)]
            )

            async def wait() -> list[int]:
                return await asyncio.to_thread(pending.get, 120)

            failures, snapshots = await poll_while(engine, "s", wait)
        assert failures == [0, 0, 0, 0]
        final = await engine.get_messages("s", limit=None)
        assert len(final) == 160
        assert_prefix_extensions(snapshots, final)
        for p in range(4):
            for t in range(4):
                mine = [m.content for m in final if m.content.startswith(f"p{p}/{t}/")]
                assert mine == [f"p{p}/{t}/{i}" for i in range(10)]
        assert await stored(engine, "s") == [(m.seq, m.content) for m in final]


async def test_metadata_writers_in_2_processes_keep_every_key(
    engine: ContextEngine, db_url: str
) -> None:
    await engine.create_session("s", "u")
    with pool(2) as workers:
        workers.starmap(_workers.set_keys, [(db_url, "s", "a", 20), (db_url, "s", "b", 20)])
    metadata = await engine.get_all_metadata("s")
    assert metadata == {f"{p}{i}": i for p in "ab" for i in range(20)}


async def test_chat_limit_holds_across_processes(engine: ContextEngine, db_url: str) -> None:
    await engine.create_session("s", "u")
    with pool(4) as workers:
        created = workers.starmap(_workers.create_chats, [(db_url, "s", 6, 5)] * 4)
    assert sum(created) == 4  # the default chat is the fifth
    async with engine._store.engine.connect() as conn:
        chats = (await conn.execute(text("SELECT count(*) FROM ctx_chats"))).scalar_one()
        counted = (await conn.execute(text("SELECT chat_count FROM ctx_sessions"))).scalar_one()
    assert chats == counted == 5


async def test_history_limit_holds_across_processes(engine: ContextEngine, db_url: str) -> None:
    """4 processes x 4 tasks race for the last places of a chat: exactly the limit is
    stored, with seqs 1..limit, and every other call was refused."""
    await engine.create_session("s", "u", max_messages=50)  # a chat's cap is fixed at creation
    with pool(4) as workers:
        refused = workers.starmap(_workers.append_under_limit, [(db_url, "s", 4, 10, 50)] * 4)
    assert sum(refused) == 160 - 50
    assert [seq for seq, _ in await stored(engine, "s")] == list(range(1, 51))
    async with engine._store.engine.connect() as conn:
        chat = (await conn.execute(text("SELECT next_seq, message_count FROM ctx_chats"))).one()
    assert tuple(chat) == (50, 50)


async def test_trimming_holds_the_limit_across_processes(
    engine: ContextEngine, db_url: str
) -> None:
    """4 processes x 4 tasks append 160 messages to a chat of 50 that trims: every
    call succeeds, and the chat keeps exactly the newest 50 (its system prompt too)."""
    await engine.create_session("s", "u", max_messages=50)
    await engine.add_message("s", "system", "be brief")
    with pool(4) as workers:
        workers.starmap(_workers.append_trimming, [(db_url, "s", 4, 10, 50)] * 4)
    kept = await stored(engine, "s")
    assert kept[0] == (1, "be brief")
    assert [seq for seq, _ in kept[1:]] == list(range(161 - 48, 162))
    async with engine._store.engine.connect() as conn:
        chat = (await conn.execute(text("SELECT next_seq, message_count FROM ctx_chats"))).one()
    assert tuple(chat) == (161, 50)


async def test_appends_after_an_expected_seq_never_interleave_across_processes(
    engine: ContextEngine, db_url: str
) -> None:
    """4 processes x 3 tasks append, each after the newest seq it read: every stored
    message follows the one its writer saw, and every other attempt was refused."""
    await engine.create_session("s", "u", max_messages=None)
    start_at = time.time() + 4  # after the spawned writers have started
    with pool(4) as workers:
        lost = workers.starmap(
            _workers.append_if_last, [(db_url, "s", f"w{w}", 3, 8, start_at) for w in range(4)]
        )
    history = await engine.get_messages("s", limit=None)
    assert [m.seq for m in history] == list(range(1, len(history) + 1))
    assert all(m.metadata["after"] == m.seq - 1 for m in history)
    assert len(history) + sum(lost) == 4 * 3 * 8
    assert sum(lost) > 0  # the writers did race
