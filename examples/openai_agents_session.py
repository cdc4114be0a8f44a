"""The OpenAI Agents SDK keeping its conversation in ctxengine, offline.

A stand-in model (the SDK's own ``Model`` interface, no network) answers; the
``Runner`` reads and writes the history through ``ContextEngineSession``: switching an
agent over is the ``session=`` argument. Like the SDK's own sessions, it never expires
for idleness and keeps every item unless given ``idle_timeout`` or ``max_items``; run
again against the same database (``CTXENGINE_DATABASE_URL``), the conversation goes on.

    pip install "ctxengine[openai-agents]"
    python examples/openai_agents_session.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from agents import Agent, Model, ModelResponse, Runner, Usage, set_tracing_disabled
from openai.types.responses import ResponseOutputMessage, ResponseOutputText

from ctxengine import ContextEngine, EngineSettings
from ctxengine.integrations.openai_agents import ContextEngineSession


class StandInModel(Model):
    """Answers the last user message, saying how much history it was given."""

    async def get_response(
        self, system_instructions: Any, input: Any, *args: Any, **kwargs: Any
    ) -> ModelResponse:
        items = [{"role": "user", "content": input}] if isinstance(input, str) else input
        question = next(i["content"] for i in reversed(items) if i.get("role") == "user")
        text = f"You asked {question!r}; I remember {len(items) - 1} earlier items."
        answer = ResponseOutputMessage(
            id=f"msg_{len(items)}",
            type="message",
            role="assistant",
            status="completed",
            content=[ResponseOutputText(type="output_text", text=text, annotations=[])],
        )
        return ModelResponse(output=[answer], usage=Usage(), response_id=None)

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("this example does not stream")


async def main(url: str) -> None:
    set_tracing_disabled(True)  # offline: no trace export
    agent = Agent(name="assistant", instructions="Be helpful.", model=StandInModel())
    async with (
        ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine,
        ContextEngineSession(engine, "support-42", user_id="ada", tier="basic") as session,
    ):
        for question in ("Where is my order?", "Can I change the address?", "Thanks!"):
            result = await Runner.run(agent, question, session=session)
            print(f"user: {question}\nbot:  {result.final_output}")

        items = await session.get_items()
        print(f"{len(items)} items stored, in order:", [item.get("role") for item in items])
        last = await session.pop_item()
        assert last is not None
        print("popped the last item:", last)
        await session.add_items([last])  # and put it back
        stats = await engine.get_session_stats("support-42")
        stored = await engine.get_session("support-42")
        assert stored is not None
        print(
            f"engine session: {stats.total_messages} messages, tier {stored.tier},"
            f" status {stored.status.value}, idle timeout {stored.idle_timeout}"
        )

        # A capped session keeps its newest whole turns (a user item and what follows).
        async with ContextEngineSession(engine, "support-43", max_items=4) as short:
            for question in ("One?", "Two?", "Three?"):
                await Runner.run(agent, question, session=short)
            kept = [i.get("content") for i in await short.get_items() if i.get("role") == "user"]
            print("with max_items=4, the user items kept:", kept)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        default = f"sqlite+aiosqlite:///{Path(tmp) / 'agents.db'}"
        asyncio.run(main(os.environ.get("CTXENGINE_DATABASE_URL") or default))
