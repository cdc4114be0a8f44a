"""Context windows and compaction (SPEC §14), on both backends: get_context's budget and
whole turns, compact_history's summary, folding, conflicts and purging, the history
as shown once compacted (pages, pop, if_last_seq), export/import and checkpoints, and
several OS processes compacting and appending to one chat at once."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import time
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, Event, Message
from ctxengine.errors import ConflictError, SessionNotFoundError, ValidationError

from . import _compaction_workers

UNCAPPED = EngineSettings(auto_cleanup=False, max_messages_per_chat=None)


def shown(messages: list[Message]) -> list[tuple[int, str]]:
    return [(m.seq, m.content) for m in messages]


async def add_turns(engine: ContextEngine, sid: str, turns: range, tokens: int = 1) -> None:
    for t in turns:
        await engine.add_message(sid, "user", f"q{t}", tokens=tokens)
        await engine.add_message(sid, "assistant", f"a{t}", tokens=tokens)


class Recorder:
    """A summarizer that records what it was given and says what it replaced."""

    def __init__(self) -> None:
        self.calls: list[list[Message]] = []

    async def __call__(self, messages: list[Message]) -> str:
        self.calls.append(messages)
        return "summary of " + ",".join(m.content for m in messages)


async def stored(engine: ContextEngine, sid: str) -> list[tuple[int, str, str, bool]]:
    async with engine._store.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT seq, role, content, compacted FROM ctx_messages "
                "WHERE session_id = :s ORDER BY seq"
            ),
            {"s": sid},
        )
        return [(int(seq), role, content, bool(flag)) for seq, role, content, flag in rows]


async def chat_counters(engine: ContextEngine, sid: str) -> tuple[int, int]:
    async with engine._store.engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT next_seq, message_count FROM ctx_chats WHERE session_id = :s"),
                {"s": sid},
            )
        ).one()
        return int(row[0]), int(row[1])


# -- get_context --------------------------------------------------------------------------
async def test_context_is_the_newest_whole_turns_within_the_budget(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await engine.add_message("s", "system", "rules", tokens=3)
    await add_turns(engine, "s", range(3), tokens=2)  # seqs 2..7, 4 tokens a turn
    # the newest turn: a tool call and its result, 7 tokens in all
    await engine.add_message("s", "user", "weather?", tokens=1)
    await engine.add_message("s", "assistant", "call get_weather", tokens=2)
    await engine.add_message("s", "tool", "sunny", tokens=3)
    await engine.add_message("s", "assistant", "It is sunny.", tokens=1)

    newest = [(8, "weather?"), (9, "call get_weather"), (10, "sunny"), (11, "It is sunny.")]
    window = await engine.get_context("s", max_tokens=3 + 7 + 4 + 3)
    assert shown(window.messages) == [(1, "rules"), (6, "q2"), (7, "a2"), *newest]
    assert (window.tokens, window.max_tokens, window.complete) == (14, 17, False)

    # one token short of the newest turn: the tool result never comes without its call
    window = await engine.get_context("s", max_tokens=3 + 6)
    assert shown(window.messages) == [(1, "rules")]
    assert window.tokens == 3 and not window.complete

    whole = await engine.get_context("s", max_tokens=1000)
    assert shown(whole.messages) == shown(await engine.get_messages("s"))
    assert whole.tokens == 3 + 12 + 7 and whole.complete


async def test_system_messages_come_first_and_count_even_past_the_budget(
    engine: ContextEngine,
) -> None:
    await engine.create_session("s", "u")
    await engine.add_message("s", "system", "a long prompt", tokens=50)
    await add_turns(engine, "s", range(2), tokens=1)
    await engine.add_message("s", "system", "midway rule", tokens=1)
    await add_turns(engine, "s", range(2, 4), tokens=1)
    # every system message not compacted comes, and counts, first
    window = await engine.get_context("s", max_tokens=10)
    assert shown(window.messages) == [(1, "a long prompt"), (6, "midway rule")]
    assert window.tokens == 51 > window.max_tokens and not window.complete
    window = await engine.get_context("s", max_tokens=55)
    # the midway rule stands where it was written, before the turns kept after it
    assert shown(window.messages) == [
        (1, "a long prompt"),
        (6, "midway rule"),
        (7, "q2"),
        (8, "a2"),
        (9, "q3"),
        (10, "a3"),
    ]
    assert window.tokens == 55
    # keep_system=False: a system message is part of the turn it stands in
    window = await engine.get_context("s", max_tokens=7, keep_system=False)
    assert [m.seq for m in window.messages] == [4, 5, 6, 7, 8, 9, 10]
    window = await engine.get_context("s", max_tokens=6, keep_system=False)
    assert [m.seq for m in window.messages] == [7, 8, 9, 10] and window.tokens == 4
    window = await engine.get_context("s", max_tokens=59, keep_system=False)
    assert [m.seq for m in window.messages] == list(range(1, 11)) and window.complete


async def test_messages_without_tokens_count_by_the_token_counter(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, token_counter=len)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await engine.add_message("s", "user", "abcd")  # 4 by len
        await engine.add_message("s", "assistant", "xyz", tokens=100)  # its own count
        await engine.add_message("s", "user", "12345")  # 5
        window = await engine.get_context("s", max_tokens=5)
        assert shown(window.messages) == [(3, "12345")] and window.tokens == 5
        window = await engine.get_context("s", max_tokens=109)
        assert shown(window.messages) == [(1, "abcd"), (2, "xyz"), (3, "12345")]
        assert window.tokens == 109 and window.complete


async def test_the_default_estimate_counts_a_message_without_tokens(engine: ContextEngine) -> None:
    from ctxengine.tokens import estimate_tokens

    await engine.create_session("s", "u")
    content = 'Hello, world! {"city": "Paris", "days": 3} 東京 123456'
    await engine.add_message("s", "user", content)
    window = await engine.get_context("s", max_tokens=1000)
    # Hello , world ! {" city ": " Paris ", " days ": 3 } 東 京 123 456
    assert window.tokens == estimate_tokens(content) == 19


async def test_a_long_chat_is_read_page_by_page(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", max_messages=None)
    for start in range(0, 3000, 100):
        await engine.add_messages(
            "s",
            [
                {"role": "user" if i % 3 == 0 else "assistant", "content": str(i), "tokens": 1}
                for i in range(start, start + 100)
            ],
        )
    window = await engine.get_context("s", max_tokens=2500)
    # 2500 tokens hold the newest 833 whole turns of 3 messages, not 834
    assert len(window.messages) == window.tokens == 833 * 3 and not window.complete
    assert window.messages[0].content == "501" and window.messages[-1].content == "2999"
    assert [m.seq for m in window.messages] == list(range(502, 3001))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None, "10"])
async def test_a_bad_budget_is_refused(engine: ContextEngine, bad: Any) -> None:
    await engine.create_session("s", "u")
    with pytest.raises(ValidationError):
        await engine.get_context("s", max_tokens=bad)


async def test_context_of_a_missing_session_or_chat(engine: ContextEngine) -> None:
    with pytest.raises(SessionNotFoundError):
        await engine.get_context("nope", max_tokens=10)
    await engine.create_session("s", "u")
    window = await engine.get_context("s", max_tokens=10)
    assert window.messages == [] and window.tokens == 0 and window.complete


# -- compact_history ------------------------------------------------------------------------
async def test_compaction_replaces_the_old_turns_with_one_summary(engine: ContextEngine) -> None:
    events: list[Event] = []
    engine.subscribe(events.append, "history.compacted")
    await engine.create_session("s", "u", system_prompt="be brief")
    await add_turns(engine, "s", range(6))  # seqs 2..13
    summarize = Recorder()
    summary = await engine.compact_history("s", summarize, keep_last_turns=2)
    assert summary is not None
    assert (summary.seq, summary.role, summary.metadata) == (14, "system", {"summary_of": [2, 9]})
    assert summary.content == "summary of q0,a0,q1,a1,q2,a2,q3,a3"
    assert [[m.seq for m in call] for call in summarize.calls] == [list(range(2, 10))]
    # the summary stands where the messages it replaced stood, after the system prompt
    assert shown(await engine.get_messages("s")) == [
        (1, "be brief"),
        (14, summary.content),
        (10, "q4"),
        (11, "a4"),
        (12, "q5"),
        (13, "a5"),
    ]
    assert await engine.count_messages("s") == 6
    assert await chat_counters(engine, "s") == (14, 6)
    every = await engine.get_messages("s", limit=None, include_compacted=True)
    assert [(m.seq, m.compacted) for m in every] == [
        (1, False),
        *[(seq, True) for seq in range(2, 10)],
        *[(seq, False) for seq in range(10, 15)],
    ]
    window = await engine.get_context("s", max_tokens=10_000)
    assert shown(window.messages) == shown(await engine.get_messages("s"))
    assert [e.data for e in events] == [
        {
            "chat_id": "default",
            "seq": 14,
            "summary_of": [2, 9],
            "compacted": 8,
            "automatic": False,
        }
    ]
    assert events[0].session_id == "s" and events[0].user_id is None


async def test_a_later_compaction_folds_the_previous_summary(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(4))  # 1..8
    summarize = Recorder()
    first = await engine.compact_history("s", summarize, keep_last_turns=1)
    assert first is not None and first.metadata == {"summary_of": [1, 6]}
    await add_turns(engine, "s", range(4, 6))  # 10..13
    second = await engine.compact_history("s", summarize, keep_last_turns=1)
    assert second is not None and second.seq == 14
    assert second.metadata == {"summary_of": [1, 11]}
    # the previous summary first, then what was kept or written since
    assert [m.seq for m in summarize.calls[1]] == [9, 7, 8, 10, 11]
    assert shown(await engine.get_messages("s")) == [(14, second.content), (12, "q5"), (13, "a5")]
    flags = {seq: flag for seq, _, _, flag in await stored(engine, "s")}
    assert flags == {**dict.fromkeys(range(1, 12), True), 12: False, 13: False, 14: False}
    # keeping no turn replaces every turn, the newest too
    third = await engine.compact_history("s", summarize, keep_last_turns=0)
    assert third is not None and third.metadata == {"summary_of": [1, 13]}
    assert shown(await engine.get_messages("s")) == [(15, third.content)]


async def test_nothing_to_compact(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", system_prompt="p")
    summarize = Recorder()
    assert await engine.compact_history("s", summarize) is None  # no turn at all
    await add_turns(engine, "s", range(4))
    assert await engine.compact_history("s", summarize, keep_last_turns=4) is None
    assert await engine.compact_history("s", summarize, keep_last_turns=2) is not None
    # what is left is the 2 turns kept: nothing new to fold in
    assert await engine.compact_history("s", summarize, keep_last_turns=2) is None
    assert len(summarize.calls) == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, None, "2"])
async def test_a_bad_keep_last_turns_is_refused(engine: ContextEngine, bad: Any) -> None:
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(3))
    summarize = Recorder()
    with pytest.raises(ValidationError):
        await engine.compact_history("s", summarize, keep_last_turns=bad)
    assert summarize.calls == []


@pytest.mark.parametrize("returned", [None, 5, b"bytes", "", "  \n", ["a"]])
async def test_a_summary_that_is_not_text_writes_nothing(
    engine: ContextEngine, returned: Any
) -> None:
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(3))
    before = await stored(engine, "s")

    async def summarize(messages: list[Message]) -> Any:
        return returned

    with pytest.raises(ValidationError, match="summarizer"):
        await engine.compact_history("s", summarize, keep_last_turns=1)
    assert await stored(engine, "s") == before
    assert await chat_counters(engine, "s") == (6, 6)
    with pytest.raises(ValidationError, match="summarizer"):
        await engine.compact_history("s", "not callable", keep_last_turns=1)  # type: ignore[arg-type]


async def test_a_failing_summarizer_writes_nothing(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(3))
    before = await stored(engine, "s")

    async def summarize(messages: list[Message]) -> str:
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError, match="model down"):
        await engine.compact_history("s", summarize, keep_last_turns=1)
    assert await stored(engine, "s") == before


async def test_summary_metadata_is_reserved(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    with pytest.raises(ValidationError, match="summary_of"):
        await engine.add_message("s", "system", "fake", metadata={"summary_of": [1, 1]})
    assert await engine.count_messages("s") == 0


async def test_a_range_changed_while_summarizing_is_not_replaced(engine: ContextEngine) -> None:
    """The summarizer runs outside the transaction: a compaction that commits meanwhile
    wins, the slower one raises ConflictError and writes nothing; a message appended
    meanwhile is never compacted."""
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(4))
    inner = Recorder()

    async def slow(messages: list[Message]) -> str:
        await engine.add_message("s", "user", "meanwhile")
        assert await engine.compact_history("s", inner, keep_last_turns=1) is not None
        return "too late"

    with pytest.raises(ConflictError):
        await engine.compact_history("s", slow, keep_last_turns=1)
    rows = await stored(engine, "s")
    assert [content for _, role, content, _ in rows if role == "system"] == [
        inner.calls[0] and "summary of " + ",".join(m.content for m in inner.calls[0])
    ]
    assert (9, "user", "meanwhile", False) in rows

    async def trims(messages: list[Message]) -> str:
        await engine.trim_history("s", keep_last=1)
        return "too late"

    await add_turns(engine, "s", range(4, 6))
    with pytest.raises(ConflictError):
        await engine.compact_history("s", trims, keep_last_turns=1)
    assert not any(content == "too late" for _, _, content, _ in await stored(engine, "s"))


async def test_pages_of_a_compacted_history(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", system_prompt="p")
    await add_turns(engine, "s", range(10))  # 2..21
    await engine.compact_history("s", Recorder(), keep_last_turns=4)  # summary 22
    await add_turns(engine, "s", range(10, 12))  # 23..26
    whole = await engine.get_messages("s", limit=None)
    assert [m.seq for m in whole] == [1, 22, *range(14, 22), *range(23, 27)]
    for size in (1, 2, 3, 5, 20):
        pages: list[Message] = []
        before = None
        while True:
            page = await engine.get_messages("s", limit=size, before_seq=before)
            if not page:
                break
            pages[:0] = page
            before = page[0].seq
        assert pages == whole, size
    # the newest message shown is the one an expected-seq append follows
    (newest,) = await engine.get_messages("s", limit=1)
    assert newest.seq == 26
    added = await engine.add_message("s", "user", "next", if_last_seq=26)
    assert added.seq == 27
    with pytest.raises(ConflictError):
        await engine.add_message("s", "user", "stale", if_last_seq=26)


async def test_pop_takes_the_last_message_shown(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", system_prompt="p")
    await add_turns(engine, "s", range(3))  # 2..7
    summary = await engine.compact_history("s", Recorder(), keep_last_turns=1)  # 8
    assert summary is not None
    popped = [await engine.pop_message("s") for _ in range(4)]
    assert [m.seq if m else None for m in popped] == [7, 6, 8, 1]
    assert await engine.pop_message("s") is None
    assert await engine.count_messages("s") == 0
    assert await chat_counters(engine, "s") == (8, 0)
    # the compacted messages stay until purged
    assert len(await engine.get_messages("s", limit=None, include_compacted=True)) == 4


async def test_purge_compacted_and_purging_the_session(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(4))
    await engine.create_chat("s", chat_id="other")
    for t in range(3):
        await engine.add_message("s", "user", f"o{t}", chat_id="other")
    await engine.compact_history("s", Recorder(), keep_last_turns=1)
    await engine.compact_history("s", Recorder(), chat_id="other", keep_last_turns=1)
    shown_before = await engine.get_messages("s")
    assert await engine.purge_compacted("s") == 6 + 2
    assert await engine.get_messages("s") == shown_before
    by_seq = sorted(shown_before, key=lambda m: m.seq)
    assert await engine.get_messages("s", include_compacted=True) == by_seq
    assert await engine.count_messages("s") == 3
    assert await engine.purge_compacted("s") == 0
    with pytest.raises(SessionNotFoundError):
        await engine.purge_compacted("nope")

    await engine.create_session("t", "u")
    await add_turns(engine, "t", range(3))
    await engine.compact_history("t", Recorder(), keep_last_turns=1)
    await engine.end_session("t")
    from datetime import UTC, datetime, timedelta

    await engine.purge_sessions(ended_before=datetime.now(UTC) + timedelta(days=1))
    assert await stored(engine, "t") == []


async def test_trimming_and_clearing_count_only_messages_shown(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(5))  # 1..10
    await engine.compact_history("s", Recorder(), keep_last_turns=3)  # 11 replaces 1..4
    assert await engine.count_messages("s") == 7
    # keep the newest 2 of the 6 conversation messages shown: the oldest 2 turns go
    assert await engine.trim_history("s", keep_last=2) == 4
    assert [m.seq for m in await engine.get_messages("s")] == [11, 9, 10]
    assert await chat_counters(engine, "s") == (11, 3)
    assert len(await engine.get_messages("s", include_compacted=True, limit=None)) == 7
    assert await engine.clear_messages("s") == 7
    assert await chat_counters(engine, "s") == (11, 0)


async def test_export_import_and_checkpoints_carry_the_compaction(engine: ContextEngine) -> None:
    await engine.create_session("s", "u", system_prompt="p")
    await add_turns(engine, "s", range(4))
    await engine.compact_history("s", Recorder(), keep_last_turns=2)
    saved = await engine.checkpoint("s")
    exported = await engine.export_session("s")
    flags = [(m["seq"], m.get("compacted", False)) for m in exported["messages"]]
    assert flags == [
        (1, False),
        (2, True),
        (3, True),
        (4, True),
        (5, True),
        *[(s, False) for s in range(6, 11)],
    ]

    copy = await engine.import_session(exported, new_session_id="copy")
    assert copy.session_id == "copy"
    strip = [
        (m.seq, m.role, m.content, m.compacted)
        for m in await engine.get_messages("s", limit=None, include_compacted=True)
    ]
    assert [
        (m.seq, m.role, m.content, m.compacted)
        for m in await engine.get_messages("copy", limit=None, include_compacted=True)
    ] == strip
    assert shown(await engine.get_messages("copy")) == shown(await engine.get_messages("s"))
    assert await engine.count_messages("copy") == await engine.count_messages("s") == 6
    again = await engine.export_session("copy")
    assert again["messages"] == exported["messages"]
    # the copy compacts on from where the original was
    await add_turns(engine, "copy", range(4, 6))
    folded = await engine.compact_history("copy", Recorder(), keep_last_turns=1)
    assert folded is not None and folded.metadata == {"summary_of": [2, 12]}

    await add_turns(engine, "s", range(4, 6))
    await engine.compact_history("s", Recorder(), keep_last_turns=1)
    await engine.purge_compacted("s")
    await engine.restore_checkpoint("s", saved.checkpoint_id)
    assert [
        (m.seq, m.role, m.content, m.compacted)
        for m in await engine.get_messages("s", limit=None, include_compacted=True)
    ] == strip
    assert await engine.count_messages("s") == 6
    strip_shown = await engine.get_messages("s")

    # a session whose compacted messages were purged still shows its summary in place
    await engine.purge_compacted("s")
    purged = await engine.export_session("s")
    assert not any(m.get("compacted") for m in purged["messages"])
    await engine.import_session(purged, new_session_id="purged")
    assert shown(await engine.get_messages("purged")) == shown(strip_shown)
    assert strip_shown[1].metadata == {"summary_of": [2, 5]}  # after the prompt
    assert shown(await engine.get_messages("purged", limit=2)) == shown(strip_shown[-2:])

    bad = json.loads(json.dumps(exported))
    bad["messages"][5]["metadata"] = {"summary_of": [3, 40]}
    with pytest.raises(ValidationError, match="summary_of"):
        await engine.import_session(bad, new_session_id="bad")


# -- several processes --------------------------------------------------------------------
async def test_processes_compacting_and_appending_at_once(db_url: str) -> None:
    """4 processes each append 12 turns to one chat while compacting it 8 times: in the
    database afterwards every message is stored once, in each writer's order; exactly
    one summary is shown; each summary replaced a range no other did, and unfolding
    the latest one gives back every compacted message exactly once, in order."""
    async with ContextEngine(db_url, settings=UNCAPPED) as engine:
        await engine.create_session("s", "u", system_prompt="rules")
        start_at = time.time() + 4  # after the spawned processes have started
        with multiprocessing.get_context("spawn").Pool(4) as workers:
            results = await asyncio.to_thread(
                workers.starmap,
                _compaction_workers.append_and_compact,
                [(db_url, "s", f"w{w}", 12, 8, start_at) for w in range(4)],
            )
        committed = sum(c for c, _ in results)
        assert committed > 1 and sum(lost for _, lost in results) > 0  # they did race

        rows = await stored(engine, "s")
        seqs = [seq for seq, _, _, _ in rows]
        assert seqs == sorted(set(seqs))
        conversation = [
            (seq, content, flag) for seq, role, content, flag in rows if role != "system"
        ]
        contents = [content for _, content, _ in conversation]
        assert sorted(contents) == sorted(
            f"w{w}/{t}/{part}"
            for w in range(4)
            for t in range(12)
            for part in ("user", "call", "result")
        )
        for w in range(4):  # each writer's turns in its order, each turn's messages together
            mine = [(seq, c) for seq, c, _ in conversation if c.startswith(f"w{w}/")]
            assert [c for _, c in mine] == [
                f"w{w}/{t}/{part}" for t in range(12) for part in ("user", "call", "result")
            ]
            for t in range(12):
                turn = [seq for seq, c in mine if c.startswith(f"w{w}/{t}/")]
                assert turn == list(range(turn[0], turn[0] + 3))

        summaries = {
            seq: content for seq, role, content, _ in rows if role == "system" and seq != 1
        }
        assert len(summaries) == committed
        visible_summaries = [
            seq for seq, role, _, flag in rows if role == "system" and not flag and seq != 1
        ]
        assert len(visible_summaries) == 1
        every = {
            m.seq: m for m in await engine.get_messages("s", limit=None, include_compacted=True)
        }
        ranges = [tuple(every[seq].metadata["summary_of"]) for seq in summaries]
        assert len(set(ranges)) == len(ranges)  # one summary per range

        def unfold(seq: int) -> list[str]:
            out: list[str] = []
            for part in json.loads(summaries[seq]):
                out.extend(unfold(part["summary"]) if "summary" in part else [part["message"]])
            return out

        compacted = [content for _, content, flag in conversation if flag]
        assert unfold(visible_summaries[0]) == compacted
        first, last = every[visible_summaries[0]].metadata["summary_of"]
        assert all(first <= seq <= last for seq, _, flag in conversation if flag)
        assert all(seq > last for seq, _, flag in conversation if not flag)
        shown_now = await engine.get_messages("s", limit=None)
        assert [m.seq for m in shown_now][:2] == [1, visible_summaries[0]]
        assert [m.content for m in shown_now[2:]] == [c for _, c, flag in conversation if not flag]
        next_seq, count = await chat_counters(engine, "s")
        assert (next_seq, count) == (seqs[-1], len(shown_now))


# -- automatic compaction -------------------------------------------------------------------
async def settled(engine: ContextEngine, seconds: float = 10.0) -> None:
    """Wait for the engine's background compactions to finish."""
    for _ in range(int(seconds / 0.01)):
        if engine._runtime().context.running == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("background compaction still running")


def compacting(summarizer: Any, **settings: Any) -> EngineSettings:
    return EngineSettings(
        auto_cleanup=False,
        history_overflow="compact",
        summarizer=summarizer,
        compact_keep_last_turns=1,
        **settings,
    )


async def test_an_append_past_the_cap_commits_and_compaction_follows(db_url: str) -> None:
    release = asyncio.Event()
    summarize = Recorder()

    async def gated(messages: list[Message]) -> str:
        await release.wait()  # the writer must not wait for this
        return await summarize(messages)

    settings = compacting(gated, max_messages_per_chat=6)
    async with ContextEngine(db_url, settings=settings) as engine:
        events: list[Event] = []
        engine.subscribe(events.append, "history.compacted")
        await engine.create_session("s", "u", system_prompt="p")
        await add_turns(engine, "s", range(2))  # 5 messages: within the cap
        await asyncio.sleep(0.05)
        assert engine._runtime().context.running == 0
        await add_turns(engine, "s", range(2, 4))  # 9: past it, and every append committed
        assert await engine.count_messages("s") == 9
        assert engine._runtime().context.running == 1
        release.set()
        await settled(engine)
        assert [m.seq for m in summarize.calls[0]] == [2, 3, 4, 5, 6, 7]
        assert [m.seq for m in await engine.get_messages("s")] == [1, 10, 8, 9]
        assert await engine.count_messages("s") == 4
        assert [(e.data["automatic"], e.data["summary_of"]) for e in events] == [(True, [2, 7])]
        # appends past the cap while it ran were looked at again once it finished
        assert len(summarize.calls) == 1


async def test_a_history_past_max_context_tokens_is_compacted(db_url: str) -> None:
    calls: list[list[Message]] = []

    async def summarize(messages: list[Message]) -> str:
        calls.append(messages)
        return "short"  # 1 token

    settings = compacting(summarize, max_messages_per_chat=None, max_context_tokens=10)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await add_turns(engine, "s", range(2), tokens=2)  # 8 tokens
        await settled(engine)
        assert calls == []
        await add_turns(engine, "s", range(2, 3), tokens=2)  # 12 tokens
        await settled(engine)
        assert [[m.seq for m in call] for call in calls] == [[1, 2, 3, 4]]
        window = await engine.get_context("s", max_tokens=10)
        assert [m.seq for m in window.messages] == [7, 5, 6] and window.complete
        assert window.tokens == 1 + 4


@pytest.mark.parametrize("failure", ["raises", "empty"])
async def test_a_failing_automatic_compaction_is_logged_and_announced(
    db_url: str, failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(messages: list[Message]) -> str:
        if failure == "raises":
            raise RuntimeError("model down")
        return ""

    async with ContextEngine(
        db_url, settings=compacting(broken, max_messages_per_chat=3)
    ) as engine:
        events: list[Event] = []
        engine.subscribe(events.append, "history.compacted")
        await engine.create_session("s", "u")
        await add_turns(engine, "s", range(3))  # never raises into the writer
        await settled(engine)
        assert await engine.count_messages("s") == 6
        assert all(not flag for *_, flag in await stored(engine, "s"))
        assert events and all(e.data["automatic"] and "error" in e.data for e in events)
        expected = "RuntimeError" if failure == "raises" else "ValidationError"
        assert {e.data["error_type"] for e in events} == {expected}
        assert any("automatic compaction failed" in r.message for r in caplog.records)


async def test_close_cancels_a_compaction_that_does_not_finish(db_url: str) -> None:
    started = asyncio.Event()

    async def endless(messages: list[Message]) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    engine = ContextEngine(db_url, settings=compacting(endless, max_messages_per_chat=2))
    await engine.initialize()
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(2))
    await asyncio.wait_for(started.wait(), 5)
    began = time.monotonic()
    await engine.close()
    assert time.monotonic() - began < 3
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("ctxengine-compact")]
    async with ContextEngine(db_url, settings=UNCAPPED) as reader:
        assert [m.seq for m in await reader.get_messages("s", include_compacted=True)] == [
            1,
            2,
            3,
            4,
        ]
        assert all(not flag for *_, flag in await stored(reader, "s"))


async def test_close_waits_for_a_compaction_about_to_finish(db_url: str) -> None:
    async def quick(messages: list[Message]) -> str:
        await asyncio.sleep(0.2)
        return "done"

    engine = ContextEngine(db_url, settings=compacting(quick, max_messages_per_chat=2))
    await engine.initialize()
    await engine.create_session("s", "u")
    await add_turns(engine, "s", range(2))
    await engine.close()
    async with ContextEngine(db_url, settings=UNCAPPED) as reader:
        assert shown(await reader.get_messages("s")) == [(5, "done"), (3, "q1"), (4, "a1")]


def test_compaction_settings_are_checked() -> None:
    async def summarize(messages: list[Message]) -> str:
        return "s"

    with pytest.raises(ValidationError, match="needs a summarizer"):
        EngineSettings(history_overflow="compact")
    with pytest.raises(ValidationError, match="max_context_tokens"):
        EngineSettings(max_context_tokens=100)
    with pytest.raises(ValidationError, match="compact_keep_last_turns"):
        EngineSettings(history_overflow="compact", summarizer=summarize, compact_keep_last_turns=-1)
    with pytest.raises(ValidationError, match="summarizer"):
        EngineSettings(summarizer="not callable")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="token_counter"):
        EngineSettings(token_counter=5)  # type: ignore[arg-type]
