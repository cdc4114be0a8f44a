"""ContextEngineSession against the real OpenAI Agents SDK (no network: a stand-in model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from agents import Agent, Model, ModelResponse, Runner, Usage, set_tracing_disabled
from agents.memory import Session, SessionSettings
from openai.types.responses import ResponseOutputMessage, ResponseOutputText

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import SessionExpiredError
from ctxengine.integrations.openai_agents import ContextEngineSession
from tests.fixtures import FakeClock

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


async def test_session_settings_limit(engine: ContextEngine) -> None:
    session = ContextEngineSession(engine, "conv", session_settings=SessionSettings(limit=2))
    await session.add_items([user(str(i)) for i in range(5)])
    assert await session.get_items() == [user("3"), user("4")]
    assert len(await session.get_items(limit=4)) == 4


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


async def test_an_expired_session_refuses_new_items(db_url: str, clock: FakeClock) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=60)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        session = ContextEngineSession(engine, "conv")
        await session.add_items([user("hi")])
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            await session.add_items([user("too late")])
        assert await session.get_items() == [user("hi")]
