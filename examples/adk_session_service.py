"""Google ADK sessions kept by ctxengine: an ADK Runner with a stand-in model (no
network), app/user/session/temp state scopes, stale copies appending at once (merged,
or refused with on_stale="raise"), and the ctxengine view of the same sessions.

Sessions are resumed when they exist, so the script runs again and again against the
same database (``CTXENGINE_DATABASE_URL``); they never expire for idleness.

    python examples/adk_session_service.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path

from google.adk.agents import LlmAgent
from google.adk.errors import StaleSessionError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import GetSessionConfig
from google.adk.sessions.session import Session
from google.adk.tools.tool_context import ToolContext
from google.genai import types

from ctxengine import ContextEngine, EngineSettings
from ctxengine.integrations.adk import ContextEngineSessionService, engine_session_id

APP = "travel"


class StandInModel(BaseLlm):
    """A stand-in for an LLM: it calls ``remember`` with what the user said, then
    answers once it sees the tool's result."""

    model: str = "stand-in"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        await asyncio.sleep(0)
        last = llm_request.contents[-1].parts or []
        if any(part.function_response for part in last):
            reply = types.Part(text=f"Noted. ({len(llm_request.contents)} contents in view)")
        else:
            said = next(part.text for part in last if part.text)
            reply = types.Part(
                function_call=types.FunctionCall(name="remember", args={"fact": said})
            )
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=len(llm_request.contents), candidates_token_count=1
        )
        yield LlmResponse(content=types.Content(role="model", parts=[reply]), usage_metadata=usage)


def remember(fact: str, tool_context: ToolContext) -> dict[str, str]:
    """Remember a fact about the user."""
    tool_context.state["user:facts"] = [*tool_context.state.get("user:facts", []), fact]
    tool_context.state["temp:last_fact"] = fact  # this invocation only, never stored
    tool_context.state["app:facts_recorded"] = tool_context.state.get("app:facts_recorded", 0) + 1
    return {"status": "remembered"}


async def turn(runner: Runner, engine: ContextEngine, user: str, session: str, text: str) -> str:
    """One user turn through the ADK Runner, counted as a ctxengine request."""
    answer = ""
    async with engine.track_request(engine_session_id(APP, user, session)):
        async for event in runner.run_async(
            user_id=user,
            session_id=session,
            new_message=types.Content(role="user", parts=[types.Part(text=text)]),
        ):
            if event.is_final_response() and event.content and event.content.parts:
                answer = "".join(p.text or "" for p in event.content.parts)
    return answer


async def resume(
    service: ContextEngineSessionService, user: str, session: str, state: dict[str, str]
) -> Session:
    """The stored session, or a new one with ``state``."""
    found = await service.get_session(app_name=APP, user_id=user, session_id=session)
    if found is not None:
        return found
    return await service.create_session(app_name=APP, user_id=user, session_id=session, state=state)


async def main(url: str) -> None:
    async with (
        ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine,
        ContextEngineSessionService(engine) as service,  # closing it leaves the engine open
    ):
        agent = LlmAgent(
            name="concierge",
            model=StandInModel(),
            instruction="Remember what the traveller tells you.",
            tools=[remember],
            output_key="last_answer",
        )
        runner = Runner(agent=agent, app_name=APP, session_service=service)

        # Two sessions of ada, one of grace; the runner writes events and state.
        await resume(service, "ada", "trip-1", {})
        await resume(service, "grace", "trip-1", {"city": "Lima"})
        print("ada:", await turn(runner, engine, "ada", "trip-1", "I prefer window seats"))
        print("ada:", await turn(runner, engine, "ada", "trip-1", "I am vegetarian"))
        print("grace:", await turn(runner, engine, "grace", "trip-1", "I travel light"))
        ada2 = await resume(service, "ada", "trip-2", {})
        print("ada's second session sees her user state:", ada2.state)

        # State scopes, as get_session merges them.
        session = await service.get_session(app_name=APP, user_id="ada", session_id="trip-1")
        assert session is not None
        print(f"ada/trip-1: {len(session.events)} events, state={session.state}")
        print("ada's user state:", await service.get_user_state(app_name=APP, user_id="ada"))
        recent = await service.get_session(
            app_name=APP,
            user_id="ada",
            session_id="trip-1",
            config=GetSessionConfig(num_recent_events=2),
        )
        assert recent is not None
        print("last 2 events by:", [e.author for e in recent.events])

        # Eight writers holding stale copies append at once: no staleness error, and
        # every event and every state key is kept.
        copies = [
            await service.get_session(app_name=APP, user_id="ada", session_id="trip-2")
            for _ in range(8)
        ]
        await asyncio.gather(
            *(
                service.append_event(
                    copy,
                    Event(
                        invocation_id=f"sync-{i}",
                        author="user",
                        actions=EventActions(state_delta={f"note-{i}": i}),
                    ),
                )
                for i, copy in enumerate(copies)
                if copy is not None
            )
        )
        trip2 = await service.get_session(app_name=APP, user_id="ada", session_id="trip-2")
        assert trip2 is not None
        notes = sorted(k for k in trip2.state if k.startswith("note-"))
        print(f"after 8 concurrent stale appends: {len(trip2.events)} events, keys {notes}")

        # Opting into ADK's own rule: an append from a stale copy is refused.
        strict = ContextEngineSessionService(engine, on_stale="raise")
        first, second = [
            await strict.get_session(app_name=APP, user_id="ada", session_id="trip-2")
            for _ in range(2)
        ]
        assert first is not None and second is not None
        await strict.append_event(first, Event(invocation_id="strict", author="user"))
        try:
            await strict.append_event(second, Event(invocation_id="strict", author="user"))
        except StaleSessionError:
            print('on_stale="raise": the stale copy was refused; reload it and retry')

        # The same sessions, seen through ctxengine.
        listed = await service.list_sessions(app_name=APP)
        print("sessions of the app:", [(s.user_id, s.id) for s in listed.sessions])
        sid = engine_session_id(APP, "ada", "trip-1")
        stored = await engine.get_session(sid)
        assert stored is not None
        print(
            f"ctxengine session {sid}: requests={stored.request_count}"
            f" messages={await engine.count_messages(sid)} tags={stored.tags}"
        )
        for message in await engine.get_messages(sid, limit=4):
            event = Event.model_validate_json(message.content)
            print(f"  #{message.seq} {message.role:<9} {event.author}")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        url = (
            os.environ.get("CTXENGINE_DATABASE_URL")
            or f"sqlite+aiosqlite:///{Path(tmp) / 'adk.db'}"
        )
        asyncio.run(main(url))
