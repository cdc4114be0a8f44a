"""ContextEngineMemoryService against the real Google ADK (no network: a stand-in model),
on SQLite files and PostgreSQL, embedding with HashingEmbedder."""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.adk.agents import LlmAgent
from google.adk.events.event import Event
from google.adk.memory.base_memory_service import BaseMemoryService, SearchMemoryResponse
from google.adk.memory.memory_entry import MemoryEntry
from google.adk.models import BaseLlm
from google.adk.models.llm_request import LlmRequest
from google.adk.models.llm_response import LlmResponse
from google.adk.runners import Runner
from google.adk.sessions.session import Session
from google.adk.tools import load_memory
from google.genai import types

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import HashingEmbedder
from ctxengine.errors import ValidationError
from ctxengine.integrations.adk import (
    ContextEngineMemoryService,
    ContextEngineSessionService,
    memory_source,
)
from tests.fixtures import FakeClock

APP = "travel"
SETTINGS = EngineSettings(auto_cleanup=False, embedder=HashingEmbedder(256))


@pytest.fixture
async def mem(db_url: str, clock: FakeClock) -> AsyncIterator[ContextEngine]:
    """An engine embedding with HashingEmbedder(256), on the test clock."""
    async with ContextEngine(db_url, settings=SETTINGS, clock=clock) as engine:
        yield engine
        assert engine._store.connections_in_use() == 0


@pytest.fixture
def memory(mem: ContextEngine) -> ContextEngineMemoryService:
    return ContextEngineMemoryService(mem)


def said(text: str, author: str = "user", **kw: Any) -> Event:
    role = "user" if author == "user" else "model"
    content = types.Content(role=role, parts=[types.Part(text=text)])
    return Event(invocation_id="inv", author=author, content=content, **kw)


def session(user: str, sid: str, *events: Event) -> Session:
    return Session(id=sid, app_name=APP, user_id=user, events=list(events))


def texts(response: SearchMemoryResponse) -> list[str]:
    return [p.text or "" for m in response.memories for p in m.content.parts or []]


async def count(engine: ContextEngine, user: str) -> int:
    return await engine.count_memories(user_id=user, namespace=APP)


# -- the contract -----------------------------------------------------------------------


def shape(function: Any) -> list[tuple[str, Any, Any]]:
    params = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default) for p in params]


def test_it_implements_every_method_with_adks_signatures() -> None:
    assert issubclass(ContextEngineMemoryService, BaseMemoryService)
    assert not ContextEngineMemoryService.__abstractmethods__
    for name in (
        "add_session_to_memory",
        "add_events_to_memory",
        "add_memory",
        "search_memory",
        "delete_memory",
    ):
        ours = getattr(ContextEngineMemoryService, name)
        assert ours is not getattr(BaseMemoryService, name), name
        assert shape(ours) == shape(getattr(BaseMemoryService, name)), name


# -- a Runner turn with load_memory -----------------------------------------------------


class RecallingModel(BaseLlm):
    """A stand-in LLM: it calls ``load_memory`` with the user's words, then replies
    with what the tool returned (ADK hands a model the tool's result as a string)."""

    model: str = "recalling"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        last = llm_request.contents[-1].parts or []
        answers = [p.function_response for p in last if p.function_response]
        if answers:
            reply = types.Part(text=str((answers[0].response or {}).get("result")))
        else:
            query = next(p.text for p in last if p.text)
            call = types.FunctionCall(name="load_memory", args={"query": query})
            reply = types.Part(function_call=call)
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=1, candidates_token_count=1
        )
        yield LlmResponse(content=types.Content(role="model", parts=[reply]), usage_metadata=usage)


class AckModel(BaseLlm):
    """A stand-in LLM that acknowledges what the user said."""

    model: str = "ack"

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        heard = next(p.text for p in llm_request.contents[-1].parts or [] if p.text)
        reply = types.Part(text=f"Noted: {heard}")
        usage = types.GenerateContentResponseUsageMetadata(
            prompt_token_count=1, candidates_token_count=1
        )
        yield LlmResponse(content=types.Content(role="model", parts=[reply]), usage_metadata=usage)


async def turn(runner: Runner, user: str, sid: str, text: str) -> str:
    replies: list[str] = []
    async for event in runner.run_async(
        user_id=user,
        session_id=sid,
        new_message=types.Content(role="user", parts=[types.Part(text=text)]),
    ):
        if event.is_final_response() and event.content and event.content.parts:
            replies.extend(p.text for p in event.content.parts if p.text)
    return " ".join(replies)


async def test_a_runner_turn_loads_what_an_earlier_session_of_the_user_said(
    mem: ContextEngine,
) -> None:
    sessions = ContextEngineSessionService(mem)
    memory = ContextEngineMemoryService(mem)

    def runner(model: BaseLlm, tools: list[Any]) -> Runner:
        agent = LlmAgent(name="agent", model=model, tools=tools)
        return Runner(
            agent=agent,
            app_name=APP,
            session_service=sessions,
            memory_service=memory,
            auto_create_session=True,
        )

    # Earlier sessions: ada's and bob's, each added to memory when it ended.
    for user, fact in (
        ("ada", "My flight to Lisbon leaves on Tuesday"),
        ("bob", "My flight to Paris leaves on Friday"),
    ):
        assert await turn(runner(AckModel(), []), user, "earlier", fact) == f"Noted: {fact}"
        earlier = await sessions.get_session(app_name=APP, user_id=user, session_id="earlier")
        assert earlier is not None
        await memory.add_session_to_memory(earlier)
    # A second tenant's ada, in the same app, with a fact of her own.
    acme = ContextEngineMemoryService(mem.tenant("acme"))
    await acme.add_session_to_memory(
        session("ada", "earlier", said("My flight to Berlin leaves on Monday"))
    )

    # A later session of ada: the model asks memory, and is told the earlier fact.
    reply = await turn(
        runner(RecallingModel(), [load_memory]), "ada", "later", "when does my flight leave?"
    )
    assert "My flight to Lisbon leaves on Tuesday" in reply
    assert "Noted: My flight to Lisbon leaves on Tuesday" in reply
    assert "Paris" not in reply  # bob's
    assert "Berlin" not in reply  # the other tenant's

    later = await sessions.get_session(app_name=APP, user_id="ada", session_id="later")
    assert later is not None
    (response,) = [r for e in later.events for r in e.get_function_responses()]
    assert response.name == "load_memory"
    assert "Lisbon" in str(response.response)

    # The other tenant's ada finds hers only.
    found = texts(await acme.search_memory(app_name=APP, user_id="ada", query="my flight"))
    assert found == ["My flight to Berlin leaves on Monday"]


# -- scopes -----------------------------------------------------------------------------


async def test_search_finds_the_users_memories_in_the_app_only(
    mem: ContextEngine, memory: ContextEngineMemoryService
) -> None:
    await memory.add_session_to_memory(session("ada", "s1", said("ada likes green tea")))
    await memory.add_session_to_memory(session("bob", "s1", said("bob likes green tea")))
    other_app = Session(id="s1", app_name="other", user_id="ada", events=[said("ada tea other")])
    await memory.add_session_to_memory(other_app)

    assert texts(await memory.search_memory(app_name=APP, user_id="ada", query="tea")) == [
        "ada likes green tea"
    ]
    assert texts(await memory.search_memory(app_name=APP, user_id="bob", query="tea")) == [
        "bob likes green tea"
    ]
    assert texts(await memory.search_memory(app_name="other", user_id="ada", query="tea")) == [
        "ada tea other"
    ]
    assert await memory.search_memory(app_name=APP, user_id="cyd", query="tea") == (
        SearchMemoryResponse()
    )


async def test_a_second_tenant_sees_nothing_of_the_first(mem: ContextEngine) -> None:
    first = ContextEngineMemoryService(mem)
    second = ContextEngineMemoryService(mem.tenant("acme"))
    await first.add_session_to_memory(session("ada", "s1", said("ada likes green tea")))

    assert await second.search_memory(app_name=APP, user_id="ada", query="green tea") == (
        SearchMemoryResponse()
    )
    assert await mem.tenant("acme").count_memories(user_id="ada", namespace=APP) == 0
    # The same ids in the second tenant are memories of their own, not the first's.
    await second.add_session_to_memory(session("ada", "s1", said("ada likes black tea")))
    assert texts(await second.search_memory(app_name=APP, user_id="ada", query="tea")) == [
        "ada likes black tea"
    ]
    assert texts(await first.search_memory(app_name=APP, user_id="ada", query="tea")) == [
        "ada likes green tea"
    ]


async def test_memories_outlive_their_session(mem: ContextEngine) -> None:
    sessions = ContextEngineSessionService(mem)
    memory = ContextEngineMemoryService(mem)
    created = await sessions.create_session(app_name=APP, user_id="ada", session_id="s1")
    await sessions.append_event(created, said("I keep bees in Oslo"))
    await memory.add_session_to_memory(created)
    await sessions.delete_session(app_name=APP, user_id="ada", session_id="s1")

    response = await memory.search_memory(app_name=APP, user_id="ada", query="bees")
    assert texts(response) == ["I keep bees in Oslo"]
    (hit,) = await mem.search_memory("bees", user_id="ada", namespace=APP)
    assert hit.record.session_id is None and hit.record.user_id == "ada"


# -- idempotency and what is stored ------------------------------------------------------


async def test_adding_a_session_twice_stores_nothing_twice(
    mem: ContextEngine, memory: ContextEngineMemoryService
) -> None:
    first = said("I live in Oslo")
    second = said("Noted, you live in Oslo", author="agent")
    await memory.add_session_to_memory(session("ada", "s1", first, second))
    assert await count(mem, "ada") == 2
    await memory.add_session_to_memory(session("ada", "s1", first, second))
    assert await count(mem, "ada") == 2
    # The session grew: only the new event is stored.
    third = said("and I work in Bergen")
    await memory.add_session_to_memory(session("ada", "s1", first, second, third))
    assert await count(mem, "ada") == 3
    # add_events_to_memory with the session id shares the keys.
    await memory.add_events_to_memory(app_name=APP, user_id="ada", events=[third], session_id="s1")
    assert await count(mem, "ada") == 3
    found = texts(await memory.search_memory(app_name=APP, user_id="ada", query="Oslo"))
    assert sorted(found) == ["I live in Oslo", "Noted, you live in Oslo", "and I work in Bergen"]
    # Another user's session with the same session and event ids is stored as theirs.
    await memory.add_session_to_memory(session("bob", "s1", first))
    assert await count(mem, "bob") == 1
    (hit,) = await mem.search_memory("Oslo", user_id="bob", namespace=APP)
    assert hit.record.source == memory_source(APP, "bob", "s1", first.id)


async def test_events_without_text_are_skipped(
    mem: ContextEngine, memory: ContextEngineMemoryService
) -> None:
    call = types.Part(function_call=types.FunctionCall(name="f", args={"x": 1}))
    answer = types.Part(function_response=types.FunctionResponse(name="f", response={"y": 2}))
    skipped = [
        Event(invocation_id="i", author="agent"),  # no content
        Event(invocation_id="i", author="agent", content=types.Content(role="model", parts=[])),
        Event(invocation_id="i", author="agent", content=types.Content(role="model", parts=[call])),
        Event(invocation_id="i", author="user", content=types.Content(role="user", parts=[answer])),
        said("   \n "),  # only whitespace
        Event(
            invocation_id="i",
            author="agent",
            content=types.Content(role="model", parts=[types.Part(text="hmm", thought=True)]),
        ),
        said("a streamed chunk", author="agent", partial=True),
    ]
    kept = Event(
        invocation_id="i",
        author="agent",
        content=types.Content(
            role="model",
            parts=[
                types.Part(text="thinking about the zoo", thought=True),
                types.Part(text="The zoo opens at nine."),
                call,
                types.Part(text="It closes at five."),
            ],
        ),
    )
    await memory.add_session_to_memory(session("ada", "s1", *skipped, kept))
    assert await count(mem, "ada") == 1
    (hit,) = await mem.search_memory("zoo", user_id="ada", namespace=APP)
    assert hit.record.text == "The zoo opens at nine.\nIt closes at five."


async def test_search_returns_memory_entries_as_adk_expects(
    mem: ContextEngine, memory: ContextEngineMemoryService
) -> None:
    event = said("Ask me about Lisbon", author="guide", timestamp=1_900_000_000.25)
    await memory.add_events_to_memory(
        app_name=APP,
        user_id="ada",
        events=[event],
        session_id="s9",
        custom_metadata={"topic": "travel"},
    )
    query = {"app_name": APP, "user_id": "ada", "query": "Ask me about Lisbon"}
    (entry,) = (await memory.search_memory(**query)).memories
    (record,) = [h.record for h in await mem.search_memory("x", user_id="ada", namespace=APP)]
    assert entry.id == record.memory_id
    assert entry.content == types.Content(role="model", parts=[types.Part(text=event_text(event))])
    assert entry.author == "guide"
    assert entry.timestamp == "2030-03-17T17:46:40.250000+00:00"
    assert datetime.fromisoformat(entry.timestamp) == datetime.fromtimestamp(event.timestamp, UTC)
    assert entry.custom_metadata.pop("score") == pytest.approx(1.0, abs=1e-5)
    assert entry.custom_metadata == {"topic": "travel", "session_id": "s9", "event_id": event.id}
    assert record.metadata == {
        "session_id": "s9",
        "event_id": event.id,
        "author": "guide",
        "role": "model",
        "timestamp": "2030-03-17T17:46:40.250000+00:00",
        "custom_metadata": {"topic": "travel"},
    }
    assert record.source == memory_source(APP, "ada", "s9", event.id)
    assert (record.user_id, record.session_id, record.namespace) == ("ada", None, APP)


def event_text(event: Event) -> str:
    assert event.content and event.content.parts
    return "".join(p.text or "" for p in event.content.parts)


async def test_a_blank_query_finds_nothing(memory: ContextEngineMemoryService) -> None:
    await memory.add_session_to_memory(session("ada", "s1", said("tea")))
    for query in ("", "  "):
        assert await memory.search_memory(app_name=APP, user_id="ada", query=query) == (
            SearchMemoryResponse()
        )


async def test_limit_and_min_score(mem: ContextEngine) -> None:
    facts = [said(f"fact {i} about tea") for i in range(12)] + [said("unrelated words here")]
    await ContextEngineMemoryService(mem).add_session_to_memory(session("ada", "s1", *facts))
    default = ContextEngineMemoryService(mem)
    found = (await default.search_memory(app_name=APP, user_id="ada", query="tea")).memories
    assert len(found) == 10
    narrow = ContextEngineMemoryService(mem, limit=3, min_score=0.2)
    found = (await narrow.search_memory(app_name=APP, user_id="ada", query="tea")).memories
    assert len(found) == 3 and all(e.custom_metadata["score"] >= 0.2 for e in found)
    strict = ContextEngineMemoryService(mem, min_score=0.99)
    assert (await strict.search_memory(app_name=APP, user_id="ada", query="tea")).memories == []


async def test_shared_memories_only_when_asked(mem: ContextEngine) -> None:
    await mem.add_memory("the office closes at six", namespace=APP)  # tenant-wide
    private = ContextEngineMemoryService(mem)
    shared = ContextEngineMemoryService(mem, include_shared=True)
    query = {"app_name": APP, "user_id": "ada", "query": "office"}
    assert texts(await private.search_memory(**query)) == []
    (entry,) = (await shared.search_memory(**query)).memories
    assert texts(SearchMemoryResponse(memories=[entry])) == ["the office closes at six"]
    assert entry.author is None and entry.content.role == "user"


# -- explicit memories, deletion, custom metadata ---------------------------------------


async def test_add_memory_entries_search_and_delete(
    mem: ContextEngine, memory: ContextEngineMemoryService
) -> None:
    entries = [
        MemoryEntry(
            id="pref-1",
            content=types.Content(role="user", parts=[types.Part(text="prefers aisle seats")]),
            author="user",
            timestamp="2030-01-01T00:00:00+00:00",
            custom_metadata={"kind": "preference"},
        ),
        MemoryEntry(content=types.Content(parts=[types.Part(text="allergic to peanuts")])),
    ]
    await memory.add_memory(app_name=APP, user_id="ada", memories=entries)
    assert await count(mem, "ada") == 2
    await memory.add_memory(app_name=APP, user_id="ada", memories=entries[:1])  # has an id
    assert await count(mem, "ada") == 2
    await memory.add_memory(app_name=APP, user_id="ada", memories=entries[1:])  # has none
    assert await count(mem, "ada") == 3

    (seat,) = (await memory.search_memory(app_name=APP, user_id="ada", query="aisle")).memories[:1]
    assert texts(SearchMemoryResponse(memories=[seat])) == ["prefers aisle seats"]
    assert (seat.author, seat.timestamp) == ("user", "2030-01-01T00:00:00+00:00")
    assert seat.custom_metadata["kind"] == "preference"

    assert seat.id is not None
    await memory.delete_memory(app_name=APP, user_id="ada", memory_id=seat.id)
    assert await count(mem, "ada") == 2
    assert "prefers aisle seats" not in texts(
        await memory.search_memory(app_name=APP, user_id="ada", query="aisle")
    )
    await memory.delete_memory(app_name=APP, user_id="ada", memory_id=seat.id)  # gone: no-op
    await memory.delete_memory(app_name=APP, user_id="ada", memory_id=None)
    assert await count(mem, "ada") == 2


async def test_an_entry_without_text_writes_nothing(
    mem: ContextEngine, memory: ContextEngineMemoryService
) -> None:
    image = types.Part(inline_data=types.Blob(mime_type="image/png", data=b"\x89PNG"))
    entries = [
        MemoryEntry(content=types.Content(parts=[types.Part(text="fine")])),
        MemoryEntry(content=types.Content(parts=[image])),
    ]
    with pytest.raises(ValueError, match=r"memories\[1\] has no text"):
        await memory.add_memory(app_name=APP, user_id="ada", memories=entries)
    assert await count(mem, "ada") == 0


async def test_custom_metadata_ttl_and_importance(
    mem: ContextEngine, memory: ContextEngineMemoryService, clock: FakeClock
) -> None:
    await memory.add_events_to_memory(
        app_name=APP,
        user_id="ada",
        events=[said("the gate code is 4711")],
        custom_metadata={"ttl": 60, "importance": 3.0},
    )
    (hit,) = await mem.search_memory("gate code", user_id="ada", namespace=APP)
    assert hit.record.importance == 3.0
    assert hit.record.expires_at == clock.now + timedelta(seconds=60)
    assert "custom_metadata" not in hit.record.metadata
    clock.advance(61)
    assert await memory.search_memory(app_name=APP, user_id="ada", query="gate code") == (
        SearchMemoryResponse()
    )


async def test_engine_errors_are_raised(
    mem: ContextEngine, memory: ContextEngineMemoryService, db_url: str
) -> None:
    with pytest.raises(ValidationError):
        await memory.add_events_to_memory(
            app_name=APP, user_id="ada", events=[said("x y")], custom_metadata={"ttl": -1}
        )
    with pytest.raises(ValidationError):
        await memory.add_memory(
            app_name=APP,
            user_id="ada",
            memories=[MemoryEntry(content=types.Content(parts=[types.Part(text="x")]))],
            custom_metadata={"importance": "very"},
        )
    with pytest.raises(ValidationError):
        await memory.search_memory(app_name="", user_id="ada", query="x")
    assert await count(mem, "ada") == 0
    # With no embedder, the engine's error names the setting.
    async with ContextEngine(db_url, settings=EngineSettings(auto_cleanup=False)) as plain:
        with pytest.raises(ValidationError, match="embedder"):
            await ContextEngineMemoryService(plain).add_session_to_memory(
                session("ada", "s1", said("tea"))
            )


async def test_a_closed_service_refuses_calls(memory: ContextEngineMemoryService) -> None:
    async with memory:
        await memory.add_session_to_memory(session("ada", "s1", said("tea")))
    with pytest.raises(RuntimeError, match="ContextEngineMemoryService is closed"):
        await memory.search_memory(app_name=APP, user_id="ada", query="tea")
    await memory.close()  # idempotent


def test_long_ids_make_a_hashed_source() -> None:
    assert memory_source("app", "ada", "s1", "e1") == '["adk","app","ada","s1","e1"]'
    assert memory_source("app", "ada", None, "e1") == '["adk","app","ada",null,"e1"]'
    long = memory_source("app", "ada", "s" * 3000, "e1")
    assert long.startswith("adk#") and len(long) == 68
    assert long != memory_source("app", "ada", "s" * 3000, "e2")
