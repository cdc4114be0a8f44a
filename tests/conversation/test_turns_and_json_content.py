"""Trimming removes whole turns (a tool result never without its call); JSON content is
stored as its JSON text, redacted value by value."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ctxengine import ContextEngine, EngineSettings, Event
from ctxengine.errors import HistoryLimitError, ValidationError
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS

QUIET = {"auto_cleanup": False}


def turn(i: int, tools: int = 1) -> list[dict[str, Any]]:
    """A user message, ``tools`` function calls each with its output, an answer."""
    items: list[dict[str, Any]] = [{"role": "user", "content": f"q{i}"}]
    for k in range(tools):
        call = {"type": "function_call", "call_id": f"c{i}.{k}", "name": "f", "arguments": "{}"}
        items.append({"role": "tool", "content": call})
        output = {"type": "function_call_output", "call_id": f"c{i}.{k}", "output": "ok"}
        items.append({"role": "tool", "content": output})
    items.append({"role": "assistant", "content": f"a{i}"})
    return items


def unpaired_outputs(contents: list[str]) -> list[str]:
    """call_ids of function outputs whose call is not in ``contents``."""
    items = [json.loads(c) for c in contents if c.startswith("{")]
    calls = {i["call_id"] for i in items if i["type"] == "function_call"}
    outputs = [i["call_id"] for i in items if i["type"] == "function_call_output"]
    return [call_id for call_id in outputs if call_id not in calls]


@pytest.mark.parametrize("batch", [1, 3, 8])
async def test_a_cap_drops_whole_turns_only(db_url: str, batch: int) -> None:
    """Whatever the size of each append (one statement or a transaction on PostgreSQL),
    what the chat keeps starts at a user message and pairs every output with its call."""
    settings = EngineSettings(**QUIET, max_messages_per_chat=20)  # turns of 4 to 8
    async with ContextEngine(db_url, settings=settings) as engine:
        trimmed: list[Event] = []
        engine.subscribe(trimmed.append, "history.trimmed")
        await engine.create_session("s", "u", system_prompt="rules")
        items = [item for i in range(24) for item in turn(i, tools=1 + i % 3)]
        for start in range(0, len(items), batch):
            await engine.add_messages("s", items[start : start + batch])
            history = await engine.get_messages("s", limit=None)
            assert len(history) <= 20
            assert history[0].content == "rules"
            kept = [m for m in history if m.role != "system"]
            assert kept and kept[0].role == "user", [m.content for m in kept]
            assert unpaired_outputs([m.content for m in kept]) == []
            assert await engine.count_messages("s") == len(history)
        removed = sum(e.data["removed"] for e in trimmed)
        assert removed == len(items) + 1 - len(await engine.get_messages("s", limit=None))
        assert {e.data["chat_id"] for e in trimmed} == {"default"}


async def test_a_turn_longer_than_the_cap_is_refused_whole(db_url: str) -> None:
    settings = EngineSettings(**QUIET, max_messages_per_chat=6)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await engine.add_messages("s", turn(0))  # 4 messages
        await engine.add_messages("s", turn(1)[:3])  # the first turn goes
        assert (await engine.get_messages("s"))[0].content == "q1"
        before = await engine.get_messages("s")
        with pytest.raises(HistoryLimitError):  # the turn in progress would be split
            await engine.add_messages("s", turn(1, tools=3)[3:])
        assert await engine.get_messages("s") == before
        assert await engine.count_messages("s") == 3


async def test_trim_history_keeps_whole_turns(engine: ContextEngine) -> None:
    trimmed: list[Event] = []
    engine.subscribe(trimmed.append, "history.trimmed")
    await engine.create_session("s", "u")
    await engine.add_messages("s", turn(0) + turn(1) + turn(2))  # 4 messages each
    assert await engine.trim_history("s", 5) == 8  # not 7: that would split turn 1
    assert (await engine.get_messages("s"))[0].content == "q2"
    assert await engine.trim_history("s", 1) == 0  # the newest turn stays whole
    assert await engine.trim_history("s", 0) == 4  # keeping none splits nothing
    assert await engine.count_messages("s") == 0
    assert [e.data["removed"] for e in trimmed] == [8, 4]


async def test_adapter_sessions_can_have_no_cap(db_url: str) -> None:
    settings = EngineSettings(**QUIET, max_messages_per_chat=3)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("uncapped", "u", max_messages=None)
        capped = await engine.create_chat("uncapped", max_messages=2)
        await engine.add_messages("uncapped", turn(0) * 3)
        assert await engine.count_messages("uncapped") == 12
        assert capped.max_messages == 2
        chats = {c.chat_id: c.max_messages for c in await engine.list_chats("uncapped")}
        assert chats["default"] is None


async def test_json_content_is_redacted_value_by_value_and_parses_back(db_url: str) -> None:
    settings = EngineSettings(**QUIET, redact_patterns=DEFAULT_SECRET_PATTERNS)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        item = {
            "role": "user",
            "content": [{"type": "input_text", "text": 'my password=hunter2 "quoted"'}],
            "meta": {"password": "hunter2", "api_key": "k-123", "max_tokens": 5},
        }
        stored = await engine.add_message("s", "user", item)
        data = json.loads(stored.content)
        assert "hunter2" not in stored.content and "k-123" not in stored.content
        assert data["meta"] == {"password": "[REDACTED]", "api_key": "[REDACTED]", "max_tokens": 5}
        assert data["content"][0]["text"].startswith("my password=")
        assert data["content"][0]["text"].endswith('"quoted"')
        assert item["meta"]["password"] == "hunter2"  # the caller's item is untouched
        (read,) = await engine.get_messages("s")
        assert json.loads(read.content) == data


@pytest.mark.parametrize(
    "content", [{"x": float("nan")}, {"x": {1, 2}}, [b"bytes"], {"k": "\x00"}, 42]
)
async def test_content_that_is_not_json_data_is_refused(
    engine: ContextEngine, content: Any
) -> None:
    await engine.create_session("s", "u")
    with pytest.raises(ValidationError):
        await engine.add_message("s", "user", content)
    assert await engine.count_messages("s") == 0


async def test_if_last_seq_appends_only_after_the_expected_message(engine: ContextEngine) -> None:
    from ctxengine.errors import ConflictError

    await engine.create_session("s", "u")
    first = await engine.add_message("s", "user", "a", if_last_seq=0)
    with pytest.raises(ConflictError) as lost:
        await engine.add_messages("s", [{"role": "user", "content": "b"}] * 2, if_last_seq=0)
    assert (lost.value.expected, lost.value.actual) == (0, first.seq)
    assert await engine.count_messages("s") == 1
    added = await engine.add_messages(
        "s", [{"role": "user", "content": "b"}] * 2, if_last_seq=first.seq
    )
    assert [m.seq for m in added] == [2, 3]
    await engine.pop_message("s")  # the newest is 2 again
    assert (await engine.add_message("s", "user", "c", if_last_seq=2)).seq == 4
    with pytest.raises(ValidationError):
        await engine.add_message("s", "user", "d", if_last_seq=-1)
    assert await engine.count_messages("s") == 3
