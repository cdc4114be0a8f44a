"""ContextEngineSessionService against the real Google ADK (no network: a stand-in model)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import typing
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from google.adk.agents import LlmAgent
from google.adk.apps.app import App, EventsCompactionConfig
from google.adk.apps.base_events_summarizer import BaseEventsSummarizer
from google.adk.errors import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions, EventCompaction
from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.base_session_service import BaseSessionService, GetSessionConfig
from google.adk.sessions.database_session_service import DatabaseSessionService
from google.adk.sessions.in_memory_session_service import InMemorySessionService
from google.adk.sessions.session import Session
from google.adk.tools.tool_context import ToolContext
from google.genai import types
from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined

from ctxengine import ContextEngine, EngineSettings
from ctxengine import Event as EngineEvent
from ctxengine.errors import SessionExpiredError
from ctxengine.integrations.adk import ContextEngineSessionService, engine_session_id
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS
from tests.fixtures import FakeClock

APP = "my_app"
THIRTY_DAYS = 30 * 24 * 3600


@pytest.fixture
def service(engine: ContextEngine) -> ContextEngineSessionService:
    return ContextEngineSessionService(engine)


def user_event(text: str = "hi", *, state: dict[str, Any] | None = None, **kw: Any) -> Event:
    return Event(
        invocation_id="inv",
        author="user",
        content=types.Content(role="user", parts=[types.Part(text=text)]),
        actions=EventActions(state_delta=state or {}),
        **kw,
    )


# -- the contract -----------------------------------------------------------------------


def shape(function: Any) -> list[tuple[str, Any, Any]]:
    """Parameter names, kinds and defaults (annotations are spelled differently)."""
    params = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default) for p in params]


def test_it_implements_every_method_with_adks_signatures() -> None:
    assert issubclass(ContextEngineSessionService, BaseSessionService)
    assert not ContextEngineSessionService.__abstractmethods__
    for name in (
        "create_session",
        "get_session",
        "list_sessions",
        "delete_session",
        "append_event",
        "get_user_state",
    ):
        ours = getattr(ContextEngineSessionService, name)
        theirs = getattr(BaseSessionService, name)
        assert ours is not theirs, name
        assert shape(ours) == shape(theirs), name


def test_importing_ctxengine_does_not_import_adk() -> None:
    code = (
        "import sys, ctxengine, ctxengine.integrations, ctxengine.tenant, ctxengine.errors; "
        "assert not [m for m in sys.modules if m.startswith('google.adk')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_events_serialize_losslessly_without_none_fields() -> None:
    """Events are stored with exclude_none=True: exact only while every field that
    accepts None defaults to None, in Event and every model inside it."""
    seen: set[type[BaseModel]] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            nullable = field.annotation is Any or type(None) in typing.get_args(field.annotation)
            if nullable:
                assert field.default_factory is None, (model, name)
                assert field.default in (None, PydanticUndefined), (model, name)
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    walk(t)
                stack.extend(typing.get_args(t))

    walk(Event)
    assert len(seen) > 10


# -- sessions ---------------------------------------------------------------------------


async def test_get_missing_session_is_none(service: ContextEngineSessionService) -> None:
    assert await service.get_session(app_name=APP, user_id="u", session_id="nope") is None


async def test_create_get_delete(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    created = await service.create_session(
        app_name=APP, user_id="ada", session_id="s1", state={"key": "value"}
    )
    assert (created.app_name, created.user_id, created.id) == (APP, "ada", "s1")
    assert created.state == {"key": "value"} and created.events == []

    sid = engine_session_id(APP, "ada", "s1")
    assert sid == '["my_app","ada","s1"]'
    stored = await engine.get_session(sid)
    assert stored is not None
    assert stored.user_id == "ada" and stored.tags == ["adk", "adk-app:my_app"]
    assert stored.metadata == {"key": "value"}
    assert created.last_update_time == stored.last_activity.timestamp()

    got = await service.get_session(app_name=APP, user_id="ada", session_id="s1")
    assert got == created

    await service.delete_session(app_name=APP, user_id="ada", session_id="s1")
    assert await service.get_session(app_name=APP, user_id="ada", session_id="s1") is None
    assert await engine.get_session(sid) is None
    await service.delete_session(app_name=APP, user_id="ada", session_id="s1")  # no error


async def test_generated_and_padded_ids(service: ContextEngineSessionService) -> None:
    generated = await service.create_session(app_name=APP, user_id="u")
    blank = await service.create_session(app_name=APP, user_id="u", session_id="   ")
    assert generated.id and blank.id.strip() and generated.id != blank.id
    # Like ADK's in-memory service, ids are stripped of surrounding blanks.
    padded = await service.create_session(app_name=APP, user_id="u", session_id=" s ")
    assert padded.id == "s"
    with pytest.raises(AlreadyExistsError):
        await service.create_session(app_name=APP, user_id="u", session_id="s  ")
    got = await service.get_session(app_name=APP, user_id="u", session_id="\ts ")
    assert got is not None and got.id == "s"
    await service.delete_session(app_name=APP, user_id="u", session_id=" s")
    assert await service.get_session(app_name=APP, user_id="u", session_id="s") is None


async def test_duplicate_create_raises_and_changes_nothing(
    service: ContextEngineSessionService,
) -> None:
    await service.create_session(app_name=APP, user_id="u", session_id="s", state={"k": 1})
    with pytest.raises(AlreadyExistsError):
        await service.create_session(
            app_name=APP, user_id="u", session_id="s", state={"k": 2, "app:a": 1, "user:b": 2}
        )
    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None and got.state == {"k": 1}


async def test_too_long_ids_raise_value_error(service: ContextEngineSessionService) -> None:
    with pytest.raises(ValueError, match="at most 255"):
        await service.create_session(app_name=APP, user_id="u", session_id="x" * 250)
    with pytest.raises(ValueError, match="at most 255"):
        await service.get_user_state(app_name="a" * 120, user_id="u" * 130)
    with pytest.raises(ValueError, match="at most 255"):
        engine_session_id("a", "b", "c" * 300)


async def test_same_session_id_under_other_users_and_apps(
    service: ContextEngineSessionService,
) -> None:
    owners = [(APP, "u1"), (APP, "u2"), ("other_app", "u1")]
    for app, user in owners:
        await service.create_session(
            app_name=app, user_id=user, session_id="s1", state={"owner": f"{app}/{user}"}
        )
    first = await service.get_session(app_name=APP, user_id="u1", session_id="s1")
    assert first is not None
    await service.append_event(first, user_event("only in the first"))
    for app, user in owners:
        got = await service.get_session(app_name=app, user_id=user, session_id="s1")
        assert got is not None
        assert (got.app_name, got.user_id, got.state) == (app, user, {"owner": f"{app}/{user}"})
        assert len(got.events) == (1 if (app, user) == (APP, "u1") else 0)
    await service.delete_session(app_name=APP, user_id="u2", session_id="s1")
    assert await service.get_session(app_name=APP, user_id="u1", session_id="s1") is not None
    assert await service.get_session(app_name="other_app", user_id="u1", session_id="s1")


async def test_list_sessions(
    service: ContextEngineSessionService, engine: ContextEngine, clock: FakeClock
) -> None:
    for user, sid in [("u1", "a"), ("u1", "b"), ("u2", "c")]:
        await service.create_session(
            app_name=APP, user_id=user, session_id=sid, state={"key": sid, "user:name": user}
        )
    await service.create_session(app_name="other_app", user_id="u1", session_id="z")
    await engine.create_session("not-adk", "u1", tags=["adk-app:my_app"])
    s_a = await service.get_session(app_name=APP, user_id="u1", session_id="a")
    assert s_a is not None
    await asyncio.sleep(0.01)
    await service.append_event(s_a, user_event(state={"app:shared": True}))

    mine = (await service.list_sessions(app_name=APP, user_id="u1")).sessions
    assert [s.id for s in mine] == ["b", "a"]  # oldest update first
    assert all(s.events == [] for s in mine)
    assert {s.id: s.state for s in mine} == {
        "a": {"key": "a", "user:name": "u1", "app:shared": True},
        "b": {"key": "b", "user:name": "u1", "app:shared": True},
    }
    everyone = (await service.list_sessions(app_name=APP)).sessions
    assert sorted((s.user_id, s.id) for s in everyone) == [("u1", "a"), ("u1", "b"), ("u2", "c")]
    assert everyone[-1].id == "a"
    assert {s.id: s.state["user:name"] for s in everyone} == {"a": "u1", "b": "u1", "c": "u2"}
    assert (await service.list_sessions(app_name=APP, user_id="nobody")).sessions == []
    assert (await service.list_sessions(app_name="unknown")).sessions == []


# -- state scopes -----------------------------------------------------------------------


async def test_app_state_is_shared_by_every_user_of_the_app(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    s1 = await service.create_session(
        app_name=APP, user_id="u1", session_id="s1", state={"app:k1": "v1"}
    )
    await service.append_event(s1, user_event(state={"app:k2": "v2"}))
    s2 = await service.create_session(app_name=APP, user_id="u2", session_id="s2")
    assert s2.state == {"app:k1": "v1", "app:k2": "v2"}
    other = await service.create_session(app_name="other", user_id="u1", session_id="s1")
    assert other.state == {}
    assert await engine.get_shared_state('["adk-app", "my_app"]') == {"k1": "v1", "k2": "v2"}


async def test_user_state_is_shared_by_the_users_sessions_only(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    s1 = await service.create_session(
        app_name=APP, user_id="u1", session_id="s1", state={"user:k1": "v1"}
    )
    await service.append_event(s1, user_event(state={"user:k2": "v2"}))
    s1b = await service.create_session(app_name=APP, user_id="u1", session_id="s1b")
    assert s1b.state == {"user:k1": "v1", "user:k2": "v2"}
    assert (await service.create_session(app_name=APP, user_id="u2")).state == {}
    assert (await service.create_session(app_name="other", user_id="u1")).state == {}
    assert await service.get_user_state(app_name=APP, user_id="u1") == {"k1": "v1", "k2": "v2"}
    assert await service.get_user_state(app_name=APP, user_id="u2") == {}
    assert await engine.get_shared_state('["adk-user", "my_app", "u1"]') == {
        "k1": "v1",
        "k2": "v2",
    }


async def test_session_state_is_the_sessions_metadata(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    s1 = await service.create_session(
        app_name=APP, user_id="u1", session_id="s1", state={"sk1": "v1", "app:a": 1}
    )
    await service.append_event(s1, user_event(state={"sk2": {"nested": [1, 2]}, "user:u": 2}))
    got = await service.get_session(app_name=APP, user_id="u1", session_id="s1")
    assert got is not None
    assert got.state == {"sk1": "v1", "sk2": {"nested": [1, 2]}, "app:a": 1, "user:u": 2}
    assert got.state == s1.state
    assert await engine.get_all_metadata(engine_session_id(APP, "u1", "s1")) == {
        "sk1": "v1",
        "sk2": {"nested": [1, 2]},
    }
    s1b = await service.create_session(app_name=APP, user_id="u1", session_id="s1b")
    assert s1b.state == {"app:a": 1, "user:u": 2}


async def test_temp_state_is_never_persisted(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    session = await service.create_session(
        app_name=APP, user_id="u", session_id="s", state={"temp:t0": 0}
    )
    assert session.state == {}
    appended = await service.append_event(session, user_event(state={"temp:k1": "v1", "sk": 2}))
    assert session.state == {"temp:k1": "v1", "sk": 2}  # visible during the invocation
    assert appended.actions.state_delta == {"sk": 2}
    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None
    assert got.state == {"sk": 2}
    assert got.events[0].actions.state_delta == {"sk": 2}
    (message,) = await engine.get_messages(engine_session_id(APP, "u", "s"))
    assert "temp:" not in message.content


async def test_rich_state_values_are_stored_as_json(service: ContextEngineSessionService) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    await service.append_event(session, user_event(state={"tags": {"b"}, "pair": (1, 2)}))
    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None and got.state == {"tags": ["b"], "pair": [1, 2]}


# -- events -----------------------------------------------------------------------------


async def test_events_round_trip_exactly(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    first = Event(
        invocation_id="invocation",
        author="user",
        content=types.Content(
            role="user",
            parts=[
                types.Part(text='héllo ✓ "quoted" \\ back'),
                types.Part.from_bytes(data=b"\xff\x00\xfe image", mime_type="image/png"),
            ],
        ),
        turn_complete=True,
        partial=False,
        actions=EventActions(
            artifact_delta={"file": 0},
            transfer_to_agent="agent",
            escalate=True,
            state_delta={"k": [1, 2.5, None, {"x": None}]},
        ),
        long_running_tool_ids={"tool2", "tool1"},
        error_code="error_code",
        error_message="error_message",
        interrupted=True,
        grounding_metadata=types.GroundingMetadata(
            web_search_queries=["query1"],
            search_entry_point=types.SearchEntryPoint(sdk_blob=b"\x80blob"),
        ),
        usage_metadata=types.GenerateContentResponseUsageMetadata(
            prompt_token_count=1, candidates_token_count=1, total_token_count=2
        ),
        citation_metadata=types.CitationMetadata(),
        custom_metadata={"custom_key": "custom_value", "none": None},
        input_transcription=types.Transcription(text="input", finished=True),
        timestamp=1712345678.123456789,
    )
    second = Event(
        invocation_id="invocation",
        author="helper_agent",
        branch="root.helper_agent",
        content=types.Content(
            role="model",
            parts=[types.Part(function_call=types.FunctionCall(name="f", args={"a": 1}))],
        ),
    )
    assert await service.append_event(session, first) is first
    await service.append_event(session, second)
    assert session.events == [first, second]

    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got == session  # events, state and last_update_time alike
    messages = await engine.get_messages(engine_session_id(APP, "u", "s"))
    assert [m.role for m in messages] == ["user", "assistant"]
    assert [Event.model_validate_json(m.content) for m in messages] == [first, second]


async def test_roles_start_turns_only_at_user_input(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    """Trimming keeps or drops whole turns, which start at ``user`` messages: a
    function response (role user in ADK, even when the user sends it) is ``tool``."""
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    call = types.FunctionCall(id="call-1", name="approve", args={})
    response = types.FunctionResponse(id="call-1", name="approve", response={"ok": True})
    events = [
        user_event("book it"),
        Event(author="agent", content=types.Content(role="model", parts=[types.Part(text="ok")])),
        Event(
            author="agent",
            content=types.Content(role="model", parts=[types.Part(function_call=call)]),
        ),
        Event(
            author="user",
            content=types.Content(role="user", parts=[types.Part(function_response=response)]),
        ),
        Event(
            author="agent",
            content=types.Content(role="user", parts=[types.Part(function_response=response)]),
        ),
    ]
    for event in events:
        await service.append_event(session, event)
    messages = await engine.get_messages(engine_session_id(APP, "u", "s"))
    assert [m.role for m in messages] == ["user", "assistant", "assistant", "tool", "tool"]


async def test_last_update_time_is_the_last_activity(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    created = session.last_update_time
    await asyncio.sleep(0.01)
    await service.append_event(session, user_event())
    stored = await engine.get_session(engine_session_id(APP, "u", "s"))
    assert stored is not None
    assert session.last_update_time == stored.last_activity.timestamp() > created
    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None and got.last_update_time == session.last_update_time


async def test_partial_events_are_not_persisted(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    partial = user_event("chunk", partial=True, state={"k": 1})
    assert await service.append_event(session, partial) is partial
    assert session.events == [] and session.state == {}
    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None and got.events == [] and got.state == {}
    assert await engine.count_messages(engine_session_id(APP, "u", "s")) == 0


async def test_get_session_config(service: ContextEngineSessionService) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    for i in range(1, 6):
        await service.append_event(session, Event(author="user", timestamp=float(i)))

    async def stamps(**config: Any) -> list[float]:
        got = await service.get_session(
            app_name=APP, user_id="u", session_id="s", config=GetSessionConfig(**config)
        )
        assert got is not None
        return [e.timestamp for e in got.events]

    assert await stamps() == [1, 2, 3, 4, 5]
    assert await stamps(num_recent_events=3) == [3, 4, 5]
    assert await stamps(num_recent_events=9) == [1, 2, 3, 4, 5]
    assert await stamps(num_recent_events=0) == []
    assert await stamps(after_timestamp=4.0) == [4, 5]  # inclusive
    assert await stamps(after_timestamp=50.0) == []
    assert await stamps(after_timestamp=0.0) == [1, 2, 3, 4, 5]
    assert await stamps(after_timestamp=4.0, num_recent_events=3) == [4, 5]
    assert await stamps(after_timestamp=2.0, num_recent_events=2) == [4, 5]
    with pytest.raises(ValueError):
        GetSessionConfig(num_recent_events=-1)


async def test_after_timestamp_looks_back_over_many_pages(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    sid = engine_session_id(APP, "u", "s")
    # Stored in one transaction for speed; out of timestamp order, like stale writers.
    stamps = [float(i % 7) for i in range(250)]
    await engine.add_messages(
        sid,
        [
            {"role": "user", "content": Event(author="user", timestamp=t).model_dump_json()}
            for t in stamps
        ],
    )
    got = await service.get_session(
        app_name=APP,
        user_id="u",
        session_id=session.id,
        config=GetSessionConfig(after_timestamp=6.0, num_recent_events=30),
    )
    assert got is not None
    sixes = [i for i, t in enumerate(stamps) if t >= 6.0]
    assert [e.timestamp for e in got.events] == [6.0] * 30
    messages = await engine.get_messages(sid, limit=None)
    want = [Event.model_validate_json(messages[i].content).id for i in sixes[-30:]]
    assert [e.id for e in got.events] == want


async def test_append_to_a_missing_session_raises_adks_error(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    ghost = Session(id="ghost", app_name=APP, user_id="u")
    with pytest.raises(SessionNotFoundError):
        await service.append_event(ghost, user_event(state={"user:k": 1}))
    assert ghost.events == []
    assert await service.get_user_state(app_name=APP, user_id="u") == {}
    deleted = await service.create_session(app_name=APP, user_id="u", session_id="gone")
    await service.delete_session(app_name=APP, user_id="u", session_id="gone")
    with pytest.raises(SessionNotFoundError):
        await service.append_event(deleted, user_event())
    strict = ContextEngineSessionService(engine, on_stale="raise")
    for session in (ghost, deleted):
        with pytest.raises(SessionNotFoundError):
            await strict.append_event(session, user_event())
    assert await engine.count_sessions() == 0


async def test_idle_timeout_and_sessions_created_elsewhere(db_url: str, clock: FakeClock) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=60)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        service = ContextEngineSessionService(engine, idle_timeout=120)
        session = await service.create_session(app_name=APP, user_id="u", session_id="s")
        # created elsewhere, with the engine's 60 s: it keeps them
        await engine.create_session(
            engine_session_id(APP, "u", "old"), "u", tags=["adk", f"adk-app:{APP}"]
        )
        old = await service.get_session(app_name=APP, user_id="u", session_id="old")
        assert old is not None
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            await service.append_event(old, user_event("too late"))
        await service.append_event(session, user_event("on time"))
        clock.advance(121)
        with pytest.raises(SessionExpiredError):
            await service.append_event(session, user_event("too late", state={"k": 1}))
        got = await service.get_session(app_name=APP, user_id="u", session_id="s")
        assert got is not None
        assert len(got.events) == 1 and "k" not in got.state


async def test_a_conversation_resumes_thirty_days_later(db_url: str, clock: FakeClock) -> None:
    """Like ADK's own services, sessions never expire for idleness (the engine default,
    session_timeout=1800, is for sessions created elsewhere)."""
    settings = EngineSettings(auto_cleanup=False)
    assert settings.session_timeout == 1800
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        first = await run_turn_untracked(scribe_runner(engine), "ada", "chat", "I like tea")
        assert first == "noted (3 contents seen)"
        stored = await engine.get_session(engine_session_id(APP, "ada", "chat"))
        assert stored is not None and stored.idle_timeout is None
        clock.advance(THIRTY_DAYS)
        assert await engine.cleanup_inactive_sessions() == 0  # the sweep spares it too
        later = await run_turn_untracked(scribe_runner(engine), "ada", "chat", "I live in Oslo")
        assert later == "noted (7 contents seen)"


async def test_tenant_views_are_separate(engine: ContextEngine) -> None:
    acme = ContextEngineSessionService(engine.tenant("acme"))
    default = ContextEngineSessionService(engine)
    await acme.create_session(
        app_name=APP, user_id="u", session_id="s", state={"app:k": "acme", "who": "acme"}
    )
    assert await default.get_session(app_name=APP, user_id="u", session_id="s") is None
    created = await default.create_session(app_name=APP, user_id="u", session_id="s")
    assert created.state == {}
    got = await acme.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None and got.state == {"app:k": "acme", "who": "acme"}
    assert await engine.tenant("acme").count_sessions(tags=["adk"]) == 1


# -- concurrency ------------------------------------------------------------------------


async def test_concurrent_appends_from_stale_copies_lose_nothing(
    service: ContextEngineSessionService, engine: ContextEngine
) -> None:
    await service.create_session(app_name=APP, user_id="u", session_id="s", state={"base": 0})
    copies = [
        await service.get_session(app_name=APP, user_id="u", session_id="s") for _ in range(16)
    ]
    # Make every copy stale before the race starts.
    first = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert first is not None
    await service.append_event(first, user_event("first"))

    async def append(i: int, copy: Session | None) -> Event:
        assert copy is not None
        event = Event(
            invocation_id=f"inv{i}",
            author="user" if i % 2 else f"agent{i}",
            actions=EventActions(state_delta={f"k{i}": i, f"user:u{i}": i, f"app:a{i}": i}),
        )
        return await service.append_event(copy, event)

    events = await asyncio.gather(*(append(i, c) for i, c in enumerate(copies)))

    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None
    assert len(got.events) == 17
    messages = await engine.get_messages(engine_session_id(APP, "u", "s"), limit=None)
    seqs = [m.seq for m in messages]
    assert seqs == sorted(seqs) and len(set(seqs)) == 17
    assert [e.id for e in got.events] == [Event.model_validate_json(m.content).id for m in messages]
    assert {e.id for e in got.events[1:]} == {e.id for e in events}
    assert got.state == {
        "base": 0,
        **{f"k{i}": i for i in range(16)},
        **{f"user:u{i}": i for i in range(16)},
        **{f"app:a{i}": i for i in range(16)},
    }


# -- a full ADK Runner turn -------------------------------------------------------------


class ScriptedModel(BaseLlm):
    """A stand-in LLM: it calls ``remember`` with the user's words, then, seeing the
    tool's answer, replies with how many contents it was shown."""

    model: str = "scripted"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        contents = llm_request.contents
        last = contents[-1].parts or []
        if any(part.function_response for part in last):
            reply = types.Part(text=f"noted ({len(contents)} contents seen)")
        else:
            said = next(part.text for part in last if part.text)
            reply = types.Part(
                function_call=types.FunctionCall(name="remember", args={"fact": said})
            )
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=len(contents), candidates_token_count=1
        )
        yield LlmResponse(content=types.Content(role="model", parts=[reply]), usage_metadata=usage)


def remember(fact: str, tool_context: ToolContext) -> dict[str, str]:
    """Remember a fact about the user."""
    tool_context.state["user:facts"] = [*tool_context.state.get("user:facts", []), fact]
    tool_context.state["temp:scratch"] = fact
    tool_context.state["turns"] = tool_context.state.get("turns", 0) + 1
    return {"status": "remembered"}


async def run_turn(runner: Runner, engine: ContextEngine, user: str, sid: str, text: str) -> str:
    replies: list[str] = []
    async with engine.track_request(engine_session_id(APP, user, sid)):
        async for event in runner.run_async(
            user_id=user,
            session_id=sid,
            new_message=types.Content(role="user", parts=[types.Part(text=text)]),
        ):
            if event.is_final_response() and event.content and event.content.parts:
                replies.extend(p.text for p in event.content.parts if p.text)
    return " ".join(replies)


async def test_a_runner_turn(engine: ContextEngine) -> None:
    def runner() -> Runner:  # a fresh service and runner per turn: nothing held in memory
        agent = LlmAgent(
            name="scribe",
            model=ScriptedModel(),
            instruction="Remember what the user says.",
            tools=[remember],
            output_key="last_reply",
        )
        return Runner(
            agent=agent, app_name=APP, session_service=ContextEngineSessionService(engine)
        )

    service = ContextEngineSessionService(engine)
    await service.create_session(app_name=APP, user_id="ada", session_id="chat")
    assert await run_turn(runner(), engine, "ada", "chat", "I like tea") == (
        "noted (3 contents seen)"
    )
    assert await run_turn(runner(), engine, "ada", "chat", "I live in Oslo") == (
        "noted (7 contents seen)"
    )

    got = await service.get_session(app_name=APP, user_id="ada", session_id="chat")
    assert got is not None
    assert got.state == {
        "turns": 2,
        "last_reply": "noted (7 contents seen)",
        "user:facts": ["I like tea", "I live in Oslo"],
    }
    assert [e.author for e in got.events] == ["user", "scribe", "scribe", "scribe"] * 2
    calls = [e.get_function_calls() for e in got.events]
    assert [c[0].args for c in calls if c] == [{"fact": "I like tea"}, {"fact": "I live in Oslo"}]
    assert got.events[-1].content is not None
    assert got.events[-1].content.parts == [types.Part(text="noted (7 contents seen)")]

    sid = engine_session_id(APP, "ada", "chat")
    stored = await engine.get_session(sid)
    assert stored is not None
    assert stored.request_count == 2 and stored.error_count == 0
    assert await engine.count_messages(sid) == 8
    roles = [m.role for m in await engine.get_messages(sid)]
    assert roles == ["user", "assistant", "tool", "assistant"] * 2
    assert await service.get_user_state(app_name=APP, user_id="ada") == {
        "facts": ["I like tea", "I live in Oslo"]
    }


async def test_a_runner_creates_missing_sessions(engine: ContextEngine) -> None:
    agent = LlmAgent(name="scribe", model=ScriptedModel(), tools=[remember])
    service = ContextEngineSessionService(engine)
    runner = Runner(agent=agent, app_name=APP, session_service=service, auto_create_session=True)
    assert await run_turn_untracked(runner, "grace", "new-chat", "hello") == (
        "noted (3 contents seen)"
    )
    listed = (await service.list_sessions(app_name=APP, user_id="grace")).sessions
    assert [s.id for s in listed] == ["new-chat"]
    assert listed[0].state == {"turns": 1, "user:facts": ["hello"]}


async def run_turn_untracked(runner: Runner, user: str, sid: str, text: str) -> str:
    replies: list[str] = []
    async for event in runner.run_async(
        user_id=user,
        session_id=sid,
        new_message=types.Content(role="user", parts=[types.Part(text=text)]),
    ):
        if event.is_final_response() and event.content and event.content.parts:
            replies.extend(p.text for p in event.content.parts if p.text)
    return " ".join(replies)


def scribe_runner(engine: ContextEngine, **options: Any) -> Runner:
    """A Runner of the scribe agent on a new service (``options``: the service's);
    it creates missing sessions."""
    agent = LlmAgent(name="scribe", model=ScriptedModel(), tools=[remember])
    service = ContextEngineSessionService(engine, **options)
    return Runner(agent=agent, app_name=APP, session_service=service, auto_create_session=True)


def calls_are_whole(events: list[Event]) -> bool:
    """Every function response follows its function call (paired by id)."""
    called: set[str | None] = set()
    for event in events:
        if any(r.id not in called for r in event.get_function_responses()):
            return False
        called.update(c.id for c in event.get_function_calls())
    return True


# -- redaction and trimming ---------------------------------------------------------------


async def test_secrets_are_redacted_and_events_parse_back(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, redact_patterns=DEFAULT_SECRET_PATTERNS)
    async with ContextEngine(db_url, settings=settings) as engine:
        said = 'my password=hunter2 "and" more'
        assert await run_turn_untracked(scribe_runner(engine), "ada", "chat", said) == (
            "noted (3 contents seen)"
        )
        service = ContextEngineSessionService(engine)
        session = await service.get_session(app_name=APP, user_id="ada", session_id="chat")
        assert session is not None
        await service.append_event(
            session, Event(author="user", custom_metadata={"login": {"password": "hunter2"}})
        )
        sid = engine_session_id(APP, "ada", "chat")
        assert not any("hunter2" in m.content for m in await engine.get_messages(sid))
        got = await service.get_session(app_name=APP, user_id="ada", session_id="chat")
        assert got is not None and len(got.events) == 5  # every stored event parses back
        assert got.events[0].content is not None and got.events[0].content.parts
        assert got.events[0].content.parts[0].text == 'my password=[REDACTED] "and" more'
        (call,) = got.events[1].get_function_calls()
        assert call.args == {"fact": 'my password=[REDACTED] "and" more'}
        assert got.events[-1].custom_metadata == {"login": {"password": "[REDACTED]"}}
        again = await run_turn_untracked(scribe_runner(engine), "ada", "chat", "next turn")
        assert again == "noted (7 contents seen)"  # the metadata-only event is no content


async def test_a_capped_session_trims_whole_turns(db_url: str) -> None:
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        trims: list[EngineEvent] = []
        engine.subscribe(trims.append, "history.trimmed")
        service = ContextEngineSessionService(engine, max_events=6)
        for turn, fact in enumerate(("tea", "Oslo", "cats", "jazz")):
            runner = scribe_runner(engine, max_events=6)
            reply = await run_turn_untracked(runner, "ada", "chat", fact)
            # the model saw the one turn kept (4 events) and this turn's 3 so far
            assert reply == f"noted ({7 if turn else 3} contents seen)"
            got = await service.get_session(app_name=APP, user_id="ada", session_id="chat")
            assert got is not None and calls_are_whole(got.events)
            assert [e.author for e in got.events] == ["user", "scribe", "scribe", "scribe"]
            assert got.events[0].content is not None and got.events[0].content.parts
            assert got.events[0].content.parts[0].text == fact
        assert sum(t.data["removed"] for t in trims) == 12  # three whole turns
        (chat,) = await engine.list_chats(engine_session_id(APP, "ada", "chat"))
        assert chat.max_messages == 6


async def test_without_a_cap_nothing_is_dropped(
    service: ContextEngineSessionService,
) -> None:
    session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    events = [user_event(f"event {i}") for i in range(1100)]  # past max_messages_per_chat
    for start in range(0, len(events), 50):
        await asyncio.gather(
            *(service.append_event(session, e) for e in events[start : start + 50])
        )
    got = await service.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None
    assert len(got.events) == 1100 and {e.id for e in got.events} == {e.id for e in events}


# -- on_stale="raise" ---------------------------------------------------------------------


def texts(session: Session) -> list[str]:
    return [
        p.text or ""
        for e in session.events
        if e.content and e.content.parts
        for p in e.content.parts
    ]


async def test_on_stale_raise_refuses_stale_copies_and_writes_nothing(
    engine: ContextEngine,
) -> None:
    strict = ContextEngineSessionService(engine, on_stale="raise")
    created = await strict.create_session(app_name=APP, user_id="u", session_id="s", state={"k": 0})
    await strict.append_event(created, user_event("one"))  # a copy stays current
    await strict.append_event(created, user_event("two"))  # across its own appends
    stale = await strict.get_session(app_name=APP, user_id="u", session_id="s")
    fresh = await strict.get_session(app_name=APP, user_id="u", session_id="s")
    assert stale is not None and fresh is not None
    await strict.append_event(fresh, user_event("three", state={"k": 3}))

    for copy in (stale, created):
        with pytest.raises(StaleSessionError, match="reload it with get_session"):
            await strict.append_event(
                copy, user_event("lost", state={"k": 9, "user:x": 1, "app:y": 1, "temp:t": 1})
            )
        assert texts(copy) == ["one", "two"] and copy.state["k"] == 0
    got = await strict.get_session(app_name=APP, user_id="u", session_id="s")
    assert got is not None
    assert texts(got) == ["one", "two", "three"] and got.state == {"k": 3}
    assert await strict.get_user_state(app_name=APP, user_id="u") == {}
    assert await engine.get_shared_state(f'["adk-app", "{APP}"]') == {}

    # a copy holding no events (num_recent_events=0) is current when loaded last
    empty = await strict.get_session(
        app_name=APP, user_id="u", session_id="s", config=GetSessionConfig(num_recent_events=0)
    )
    assert empty is not None
    await strict.append_event(empty, user_event("four"))
    # a session object built by hand is compared by its newest event
    current = await strict.get_session(app_name=APP, user_id="u", session_id="s")
    assert current is not None
    by_hand = Session(id="s", app_name=APP, user_id="u", events=list(current.events))
    old = Session(id="s", app_name=APP, user_id="u", events=list(current.events[:-1]))
    with pytest.raises(StaleSessionError):
        await strict.append_event(old, user_event("lost"))
    await strict.append_event(by_hand, user_event("five"))
    # "merge" (the default) accepts the stale copy
    await ContextEngineSessionService(engine).append_event(stale, user_event("merged"))
    final = await strict.get_session(app_name=APP, user_id="u", session_id="s")
    assert final is not None
    assert texts(final) == ["one", "two", "three", "four", "five", "merged"]


async def test_on_stale_raise_raises_what_adks_database_service_raises(
    tmp_path: Any,
) -> None:
    adk = DatabaseSessionService(db_url=f"sqlite+aiosqlite:///{tmp_path / 'adk.db'}")
    created = await adk.create_session(app_name=APP, user_id="u", session_id="s")
    copy = await adk.get_session(app_name=APP, user_id="u", session_id="s")
    assert copy is not None
    await adk.append_event(created, user_event("one"))
    with pytest.raises(StaleSessionError) as theirs:
        await adk.append_event(copy, user_event("two"))
    await adk.close()
    assert isinstance(theirs.value, ValueError)


async def test_two_concurrent_runs_on_one_session(engine: ContextEngine) -> None:
    """With on_stale="raise" the second of two concurrent run_async calls on one
    session fails instead of interleaving its events with the first's."""
    await ContextEngineSessionService(engine).create_session(
        app_name=APP, user_id="ada", session_id="chat"
    )
    runs = await asyncio.gather(
        *(
            run_turn_untracked(scribe_runner(engine, on_stale="raise"), "ada", "chat", fact)
            for fact in ("tea", "coffee")
        ),
        return_exceptions=True,
    )
    failed = [r for r in runs if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], StaleSessionError), runs
    assert [r for r in runs if isinstance(r, str)] == ["noted (3 contents seen)"]
    got = await ContextEngineSessionService(engine).get_session(
        app_name=APP, user_id="ada", session_id="chat"
    )
    assert got is not None
    assert [e.author for e in got.events] == ["user", "scribe", "scribe", "scribe"]
    assert len({e.invocation_id for e in got.events}) == 1
    assert got.state == {"turns": 1, "user:facts": [texts(got)[0]]}


def test_on_stale_takes_merge_or_raise(engine: ContextEngine) -> None:
    assert ContextEngineSessionService(engine).on_stale == "merge"
    with pytest.raises(ValueError, match='on_stale must be "merge" or "raise"'):
        ContextEngineSessionService(engine, on_stale="ignore")  # type: ignore[arg-type]


# -- closing ------------------------------------------------------------------------------


async def test_async_with_and_close_leave_the_engine_open(engine: ContextEngine) -> None:
    async with ContextEngineSessionService(engine) as service:
        session = await service.create_session(app_name=APP, user_id="u", session_id="s")
    with pytest.raises(RuntimeError, match="ContextEngineSessionService is closed"):
        await service.get_session(app_name=APP, user_id="u", session_id="s")
    with pytest.raises(RuntimeError, match="is closed"):
        await service.append_event(session, user_event())
    await service.close()  # idempotent
    assert engine.is_open
    assert await engine.get_session(engine_session_id(APP, "u", "s")) is not None
    again = ContextEngineSessionService(engine)
    assert await again.get_session(app_name=APP, user_id="u", session_id="s") is not None


async def test_stale_appends_are_refused_across_processes(db_url: str) -> None:
    """4 processes load the session and append over and over with on_stale="raise":
    every stored event was written by a copy that had seen the one before it."""
    import multiprocessing
    import time

    from tests.integrations import _workers

    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        service = ContextEngineSessionService(engine, on_stale="raise")
        await service.create_session(app_name="app", user_id="u", session_id="s")
        start_at = time.time() + 4  # after the spawned writers have started
        with multiprocessing.get_context("spawn").Pool(4) as workers:
            refused = workers.starmap(
                _workers.adk_append_when_current,
                [(db_url, f"w{w}", 10, start_at) for w in range(4)],
            )
        stored = await service.get_session(app_name="app", user_id="u", session_id="s")
        assert stored is not None
        previous = ""
        for event in stored.events:
            assert event.content is not None and event.content.parts
            assert event.content.parts[0].text == previous  # the one it saw is the one before
            previous = event.id
        assert len(stored.events) + sum(refused) == 40
        assert sum(refused) > 0


# -- ADK's own compaction (EventsCompactionConfig) ----------------------------------------------


class EchoLlm(BaseLlm):
    """A stand-in LLM that answers with the texts it was shown, and records them."""

    model: str = "echo"
    seen: list[list[str]] = Field(default_factory=list)

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        texts = [p.text for c in llm_request.contents for p in c.parts or [] if p.text]
        self.seen.append(texts)
        reply = types.Part(text=f"reply {len(self.seen)}")
        yield LlmResponse(content=types.Content(role="model", parts=[reply]))


class TextSummarizer(BaseEventsSummarizer):
    """Summarizes events into one ADK compaction event, as ADK's LLM summarizer shapes
    it, without a model."""

    async def maybe_summarize_events(self, *, events: list[Event]) -> Event | None:
        texts = [p.text for e in events if e.content for p in e.content.parts or [] if p.text]
        return Event(
            author="user",
            actions=EventActions(
                compaction=EventCompaction(
                    start_timestamp=events[0].timestamp,
                    end_timestamp=events[-1].timestamp,
                    compacted_content=types.Content(
                        role="model", parts=[types.Part(text="summary: " + " | ".join(texts))]
                    ),
                )
            ),
        )


async def compacting_conversation(service: BaseSessionService) -> tuple[list[list[str]], Session]:
    """Four turns of an App that compacts every 2 invocations; what the model was shown
    each turn, and the session afterwards."""
    model = EchoLlm()
    app = App(
        name=APP,
        root_agent=LlmAgent(name="echo", model=model, instruction="Answer."),
        events_compaction_config=EventsCompactionConfig(
            summarizer=TextSummarizer(), compaction_interval=2, overlap_size=0
        ),
    )
    runner = Runner(app=app, session_service=service)
    await service.create_session(app_name=APP, user_id="ada", session_id="chat")
    for text in ("one", "two", "three", "four"):
        await run_turn_untracked(runner, "ada", "chat", text)
    session = await service.get_session(app_name=APP, user_id="ada", session_id="chat")
    assert session is not None
    return model.seen, session


@pytest.mark.filterwarnings("ignore:\\[EXPERIMENTAL\\]:UserWarning")
async def test_adk_compaction_events_work_as_in_adks_own_service(engine: ContextEngine) -> None:
    ours_seen, ours = await compacting_conversation(ContextEngineSessionService(engine))
    theirs_seen, theirs = await compacting_conversation(InMemorySessionService())
    compactions = [e for e in ours.events if e.actions.compaction is not None]
    assert len(compactions) == 2
    assert compactions[0].actions.compaction is not None
    compaction = compactions[0].actions.compaction
    assert (compaction.start_timestamp, compaction.end_timestamp) == (
        ours.events[0].timestamp,
        ours.events[3].timestamp,
    )
    summary = compaction.compacted_content.parts
    assert summary is not None and summary[0].text == "summary: one | reply 1 | two | reply 2"
    # the turns after a compaction were shown its summary instead of what it replaced
    assert ours_seen[2][:1] == ["summary: one | reply 1 | two | reply 2"]
    assert "one" not in ours_seen[2] and "two" not in ours_seen[2]
    assert ours_seen == theirs_seen
    # stored and returned as ADK wrote them
    # (ids and times differ between the two runs)
    strip: Any = {
        "id": True,
        "invocation_id": True,
        "timestamp": True,
        "actions": {"compaction": {"start_timestamp", "end_timestamp"}},
    }
    assert [e.model_dump(exclude=strip) for e in ours.events] == [
        e.model_dump(exclude=strip) for e in theirs.events
    ]
    sid = engine_session_id(APP, "ada", "chat")
    roles = [m.role for m in await engine.get_messages(sid, limit=None)]
    assert roles == ["user", "assistant"] * 2 + ["assistant"] + ["user", "assistant"] * 2 + [
        "assistant"
    ]
