"""ContextEngineSession against the real OpenAI Agents SDK (no network: a stand-in model)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents import (
    Agent,
    Model,
    ModelResponse,
    RunConfig,
    Runner,
    Usage,
    function_tool,
    set_tracing_disabled,
)
from agents.memory import Session, SessionSettings
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseOutputMessage,
    ResponseOutputText,
)

from ctxengine import ContextEngine, EngineSettings, Event
from ctxengine.errors import SessionExpiredError, ValidationError
from ctxengine.integrations.openai_agents import ContextEngineSession
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS
from tests.fixtures import FakeClock

THIRTY_DAYS = 30 * 24 * 3600

set_tracing_disabled(True)  # no trace export attempts (there is no network here)


class EchoModel(Model):
    """Answers with the last user text and how many items it was shown."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        items = [{"role": "user", "content": input}] if isinstance(input, str) else input
        self.seen.append(len(items))
        last = next(i["content"] for i in reversed(items) if i.get("role") == "user")
        text = ResponseOutputText(
            type="output_text", text=f"echo {last} ({len(items)} items)", annotations=[]
        )
        message = ResponseOutputMessage(
            id=f"msg_{len(self.seen)}",
            type="message",
            role="assistant",
            status="completed",
            content=[text],
        )
        return ModelResponse(output=[message], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def answer(text: str) -> ResponseOutputMessage:
    return ResponseOutputMessage(
        id=f"msg_{uuid.uuid4().hex}",
        type="message",
        role="assistant",
        status="completed",
        content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
    )


@function_tool
def weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class ToolModel(Model):
    """Calls ``weather`` with the last user text, then answers with the tool's output
    and how many items it was shown; it checks every tool output has its call."""

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        items = [{"role": "user", "content": input}] if isinstance(input, str) else input
        calls = {i["call_id"] for i in items if i.get("type") == "function_call"}
        outputs = [i["call_id"] for i in items if i.get("type") == "function_call_output"]
        assert set(outputs) <= calls, "a tool output without its call was sent to the model"
        last = items[-1]
        if last.get("type") == "function_call_output":
            return ModelResponse(
                output=[answer(f"{last['output']} ({len(items)} items)")],
                usage=Usage(),
                response_id=None,
            )
        city = next(i["content"] for i in reversed(items) if i.get("role") == "user")
        call = ResponseFunctionToolCall(
            type="function_call",
            id=f"fc_{uuid.uuid4().hex}",
            call_id=f"call_{uuid.uuid4().hex}",
            name="weather",
            arguments=json.dumps({"city": city}),
            status="completed",
        )
        return ModelResponse(output=[call], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError


def calls_are_whole(items: list[Any]) -> bool:
    """Every function_call_output follows its function_call (paired by call_id)."""
    seen: set[str] = set()
    for item in items:
        if item.get("type") == "function_call":
            seen.add(item["call_id"])
        elif item.get("type") == "function_call_output" and item["call_id"] not in seen:
            return False
    return True


async def test_it_is_an_agents_session(engine: ContextEngine) -> None:
    session = ContextEngineSession(engine, "conv", user_id="ada")
    assert isinstance(session, Session)
    assert await session.get_items() == []
    created = await engine.get_session("conv")
    assert created is not None and created.user_id == "ada"


async def test_items_round_trip_verbatim_in_order(engine: ContextEngine) -> None:
    session = ContextEngineSession(engine, "conv")
    items: list[Any] = [
        user("hi"),
        {"role": "assistant", "content": [{"type": "output_text", "text": "hello ✓"}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": '{"q": 1}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "developer", "content": "be brief"},
    ]
    await session.add_items(items[:2])
    await session.add_items(items[2:])
    assert await session.get_items() == items
    assert await session.get_items(limit=2) == items[-2:]
    assert await session.get_items(limit=0) == []
    assert await session.pop_item() == items[-1]
    assert await session.get_items() == items[:-1]
    roles = [m.role for m in await engine.get_messages("conv")]
    assert roles == ["user", "assistant", "tool", "tool"]
    await session.clear_session()
    assert await session.get_items() == []
    assert await session.pop_item() is None


@pytest.mark.parametrize("settings", [SessionSettings(limit=2), {"limit": 2}])
async def test_session_settings_limit(
    engine: ContextEngine, settings: SessionSettings | dict[str, Any]
) -> None:
    session = ContextEngineSession(engine, "conv", session_settings=settings)
    assert session.session_settings == SessionSettings(limit=2)
    await session.add_items([user(str(i)) for i in range(5)])
    assert await session.get_items() == [user("3"), user("4")]
    assert len(await session.get_items(limit=4)) == 4
    assert ContextEngineSession(engine, "other").session_settings == SessionSettings()


async def test_a_runner_resolves_dict_session_settings(engine: ContextEngine) -> None:
    """The Runner overlays the run's settings on the session's: a dict must have been
    coerced (as the SDK's own sessions do), or this raises AttributeError."""
    model = EchoModel()
    agent = Agent(name="echo", model=model)
    session = ContextEngineSession(engine, "conv", session_settings={"limit": 3})
    await Runner.run(agent, "one", session=session)
    await Runner.run(agent, "two", session=session)
    assert model.seen[-1] == 3  # the session's limit (2 earlier items) + the new input
    config = RunConfig(session_settings=SessionSettings(limit=1))
    result = await Runner.run(agent, "three", session=session, run_config=config)
    assert result.final_output == "echo three (2 items)"


async def test_async_with_and_close_leave_the_engine_open(engine: ContextEngine) -> None:
    async with ContextEngineSession(engine, "conv") as session:
        await session.add_items([user("hi")])
    with pytest.raises(RuntimeError, match="ContextEngineSession 'conv' is closed"):
        await session.get_items()
    with pytest.raises(RuntimeError, match="is closed"):
        await session.add_items([])
    await session.close()  # idempotent
    assert engine.is_open
    assert [json.loads(m.content) for m in await engine.get_messages("conv")] == [user("hi")]
    other = ContextEngineSession(engine, "conv")
    await other.close()
    with pytest.raises(RuntimeError, match="is closed"):
        await other.pop_item()
    assert await ContextEngineSession(engine, "conv").get_items() == [user("hi")]


async def test_concurrent_writers_keep_write_order_and_pop_takes_the_last(
    db_url: str,
) -> None:
    settings = EngineSettings(auto_cleanup=False, max_messages_per_chat=None)
    async with ContextEngine(db_url, settings=settings) as engine:
        sessions = [ContextEngineSession(engine, "shared") for _ in range(16)]

        async def write(w: int) -> None:
            for i in range(10):
                await sessions[w].add_items([user(f"{w}/{i}a"), user(f"{w}/{i}b")])

        await asyncio.gather(*(write(w) for w in range(16)))
        items = await sessions[0].get_items()
        assert len(items) == 320
        for w in range(16):
            mine = [i["content"] for i in items if i["content"].startswith(f"{w}/")]
            assert mine == [f"{w}/{i}{half}" for i in range(10) for half in "ab"]
        # each batch stays together
        for first, second in zip(items[::2], items[1::2], strict=True):
            assert first["content"][:-1] == second["content"][:-1]
        popped = await asyncio.gather(*(s.pop_item() for s in sessions))
        # sixteen concurrent pops take exactly the sixteen newest items, each once
        assert sorted(i["content"] for i in popped) == sorted(i["content"] for i in items[-16:])
        assert await sessions[0].get_items() == items[:-16]


async def test_a_runner_turn_uses_the_stored_history(engine: ContextEngine) -> None:
    model = EchoModel()
    agent = Agent(name="echo", instructions="Repeat.", model=model)
    session = ContextEngineSession(engine, "runner", user_id="ada")
    first = await Runner.run(agent, "hello", session=session)
    second = await Runner.run(agent, "again", session=session)
    assert first.final_output == "echo hello (1 items)"
    assert second.final_output == "echo again (3 items)"
    items = await session.get_items()
    assert [i.get("role") for i in items] == ["user", "assistant", "user", "assistant"]
    assert items[2] == {"role": "user", "content": "again"}
    assert await engine.count_messages("runner") == 4


async def test_a_conversation_resumes_thirty_days_later(db_url: str, clock: FakeClock) -> None:
    """Like the SDK's own stores, adapter sessions never expire for idleness (the
    engine default, session_timeout=1800, is for sessions created elsewhere)."""
    settings = EngineSettings(auto_cleanup=False)
    assert settings.session_timeout == 1800
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        agent = Agent(name="echo", model=EchoModel())
        first = await Runner.run(agent, "hello", session=ContextEngineSession(engine, "conv"))
        assert first.final_output == "echo hello (1 items)"
        stored = await engine.get_session("conv")
        assert stored is not None and stored.idle_timeout is None
        clock.advance(THIRTY_DAYS)
        assert await engine.cleanup_inactive_sessions() == 0  # the sweep spares it too
        later = await Runner.run(agent, "again", session=ContextEngineSession(engine, "conv"))
        assert later.final_output == "echo again (3 items)"


async def test_idle_timeout_and_sessions_created_elsewhere(db_url: str, clock: FakeClock) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=60)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        timed = ContextEngineSession(engine, "timed", idle_timeout=120)
        await timed.add_items([user("hi")])
        await engine.create_session("elsewhere", "ada")  # the engine's 60 s
        elsewhere = ContextEngineSession(engine, "elsewhere", idle_timeout=None)
        await elsewhere.add_items([user("hi")])
        stored = await engine.get_session("elsewhere")
        assert stored is not None and stored.idle_timeout == 60
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            await elsewhere.add_items([user("too late")])
        await timed.add_items([user("still here")])
        clock.advance(121)
        with pytest.raises(SessionExpiredError):
            await timed.add_items([user("too late")])
        assert await timed.get_items() == [user("hi"), user("still here")]
        assert await elsewhere.get_items() == [user("hi")]


async def test_secrets_are_redacted_and_items_parse_back(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, redact_patterns=DEFAULT_SECRET_PATTERNS)
    async with ContextEngine(db_url, settings=settings) as engine:
        session = ContextEngineSession(engine, "conv")
        agent = Agent(name="echo", model=EchoModel())
        await Runner.run(agent, 'my password=hunter2 "and" more', session=session)
        await session.add_items(
            [
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "login",
                    "arguments": json.dumps({"user": "ada", "password": "hunter2"}),
                },
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [{"type": "input_text", "text": "ok", "password": "hunter2"}],
                },
            ]
        )
        raw = [m.content for m in await engine.get_messages("conv")]
        assert not any("hunter2" in content for content in raw)
        items = await session.get_items()  # every stored item parses back
        assert items[0] == user('my password=[REDACTED] "and" more')
        assert json.loads(items[2]["arguments"]) == {"user": "ada", "password": "[REDACTED]"}
        assert items[3]["output"][0] == {
            "type": "input_text",
            "text": "ok",
            "password": "[REDACTED]",
        }
        result = await Runner.run(agent, "next turn", session=session)
        assert result.final_output == "echo next turn (5 items)"


async def test_a_capped_session_trims_whole_turns(db_url: str) -> None:
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        trims: list[Event] = []
        engine.subscribe(trims.append, "history.trimmed")
        agent = Agent(name="weather", model=ToolModel(), tools=[weather])
        session = ContextEngineSession(engine, "conv", max_items=6)
        for turn, city in enumerate(("Oslo", "Lima", "Pune", "Kyiv")):
            result = await Runner.run(agent, city, session=session)
            # the model saw the one turn kept (4 items) + this turn's 3 items so far
            assert result.final_output == f"sunny in {city} ({7 if turn else 3} items)"
            items = await session.get_items()
            assert calls_are_whole(items)
            assert items[0] == user(city) and len(items) == 4
            assert [i.get("type") for i in items[1:]] == [
                "function_call",
                "function_call_output",
                "message",
            ]
        assert sum(t.data["removed"] for t in trims) == 12  # three whole turns
        chat = (await engine.list_chats("conv"))[0]
        assert chat.max_messages == 6


async def test_without_a_cap_nothing_is_dropped(engine: ContextEngine) -> None:
    session = ContextEngineSession(engine, "conv")
    items = [
        item
        for i in range(400)
        for item in (
            user(f"q{i}"),
            {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{i}", "output": f"a{i}"},
        )
    ]
    for start in range(0, len(items), 300):
        await session.add_items(items[start : start + 300])
    assert await session.get_items() == items  # 1200 items, past max_messages_per_chat


# -- compaction (SPEC §14) --------------------------------------------------------------------
class RespondingEchoModel(EchoModel):
    """EchoModel whose responses have ids, as the Responses API's do: the Runner offers
    compaction after each such turn."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[list[Any]] = []

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        self.inputs.append(list(input) if not isinstance(input, str) else [user(input)])
        response = await super().get_response(system_instructions, input, *args, **kwargs)
        return ModelResponse(
            output=response.output, usage=response.usage, response_id=f"resp_{len(self.seen)}"
        )


class ItemRecorder:
    def __init__(self) -> None:
        self.calls: list[list[Any]] = []

    async def __call__(self, items: list[Any]) -> str:
        self.calls.append(items)
        return f"summary #{len(self.calls)} of {len(items)} items"


async def test_a_runner_compacts_the_session_through_the_engine(engine: ContextEngine) -> None:
    from agents.memory import OpenAIResponsesCompactionAwareSession

    model = RespondingEchoModel()
    agent = Agent(name="echo", instructions="Repeat.", model=model)
    summarize = ItemRecorder()
    session = ContextEngineSession(
        engine,
        "conv",
        summarizer=summarize,
        keep_last_turns=1,
        should_trigger_compaction=lambda context: len(context["compaction_candidate_items"]) >= 3,
    )
    assert isinstance(session, OpenAIResponsesCompactionAwareSession)
    for t in range(5):
        await Runner.run(agent, f"q{t}", session=session)
    # after turn 2 (3 answers stored) and turn 4 (the summary aside, 3 again)
    assert len(summarize.calls) == 2
    first, second = summarize.calls
    assert [i.get("content") if i.get("role") == "user" else i["role"] for i in first] == [
        "q0",
        "assistant",
        "q1",
        "assistant",
    ]
    assert second[0] == {"role": "system", "content": "summary #1 of 4 items"}
    assert len(second) == 5
    items = await session.get_items()
    assert items[0] == {"role": "system", "content": "summary #2 of 5 items"}
    assert [i.get("role") for i in items[1:]] == ["user", "assistant"]
    assert items[1] == user("q4")
    # the model was shown the summary instead of the turns it replaced
    assert model.inputs[3][0] == {"role": "system", "content": "summary #1 of 4 items"}
    assert len(model.inputs[3]) == 4  # summary, q2, its answer, q3
    everything = await engine.get_messages("conv", limit=None, include_compacted=True)
    assert len(everything) == 10 + 2 and sum(m.compacted for m in everything) == 9


async def test_run_compaction_forced_and_without_a_summarizer(engine: ContextEngine) -> None:
    plain = ContextEngineSession(engine, "plain")
    await plain.add_items([user("a"), user("b")])
    await plain.run_compaction({"force": True})  # no summarizer: nothing happens
    assert await plain.get_items() == [user("a"), user("b")]

    summarize = ItemRecorder()
    session = ContextEngineSession(engine, "conv", summarizer=summarize, keep_last_turns=1)
    await session.add_items([user("a"), {"role": "assistant", "content": "x"}, user("b")])
    await session.run_compaction()  # 1 candidate: under the SDK's default of 10
    assert summarize.calls == []
    await session.run_compaction({"force": True, "response_id": "r"})
    assert await session.get_items() == [
        {"role": "system", "content": "summary #1 of 2 items"},
        user("b"),
    ]


async def test_a_bad_item_summary_writes_nothing(engine: ContextEngine) -> None:
    async def empty(items: list[Any]) -> str:
        return " "

    session = ContextEngineSession(engine, "conv", summarizer=empty, keep_last_turns=0)
    await session.add_items([user("a"), user("b")])
    with pytest.raises(ValidationError, match="summarizer"):
        await session.run_compaction({"force": True})
    assert await session.get_items() == [user("a"), user("b")]
    with pytest.raises(ValueError, match="keep_last_turns"):
        ContextEngineSession(engine, "conv", keep_last_turns=-1)
