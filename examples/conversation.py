"""A conversation kept by ctxengine: history through a stand-in model, metadata,
trimming, several chats, checkpoint/restore, export to a JSON file and import back.

    python examples/conversation.py
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from ctxengine import ContextEngine, EngineSettings, Message, SessionTemplate
from ctxengine.redaction import DEFAULT_SECRET_PATTERNS


async def model(history: list[Message]) -> str:
    """A stand-in for an LLM: it answers the last user message, seeing the history."""
    await asyncio.sleep(0)
    question = history[-1].content
    return f"({len(history)} messages in view) you said: {question}"


async def chat(engine: ContextEngine, session_id: str, user_input: str) -> str:
    """One turn: store the question, answer from the stored history, store the answer."""
    await engine.add_message(session_id, "user", user_input)
    answer = await model(await engine.get_messages(session_id, limit=20))
    await engine.add_message(session_id, "assistant", answer, tokens=len(answer.split()))
    return answer


async def main(directory: Path) -> None:
    settings = EngineSettings(
        auto_cleanup=False,
        max_messages_per_chat=6,  # keep the system prompt and the 5 newest others
        history_overflow="trim",
        redact_patterns=DEFAULT_SECRET_PATTERNS,
    )
    url = os.environ.get("CTXENGINE_DATABASE_URL") or f"sqlite+aiosqlite:///{directory / 'ctx.db'}"
    async with ContextEngine(url, settings=settings) as engine:
        tutor = SessionTemplate(
            name="python-tutor",
            system_prompt="You are a helpful assistant. Be concise.",
            metadata={"purpose": "teaching"},
            tags=["tutor"],
        )
        for old in ("ada-1", "ada-2"):  # a fresh start when run again on the same database
            await engine.delete_session(old)
        session = await engine.create_session_from_template(tutor, "ada", session_id="ada-1")

        # History through the stand-in model; the chat trims itself at 6 messages.
        for question in ("What is Python?", "What can I build?", "How do I start?"):
            print("bot:", await chat(engine, session.session_id, question))
        history = await engine.get_messages("ada-1")
        print(f"kept {len(history)} messages, first is {history[0].role!r}:")
        for message in history:
            print(f"  #{message.seq} {message.role}: {message.content[:50]}")

        # Metadata: merged in the database, one key at a time or several.
        await engine.set_metadata("ada-1", "level", "beginner")
        await engine.update_metadata("ada-1", {"language": "en", "streak": 3})
        print("metadata:", await engine.get_all_metadata("ada-1"))

        # Secrets never reach the database.
        stored = await engine.add_message("ada-1", "user", "my key is sk-proj-Ab12Cd34Ef56Gh78Ij90")
        print("stored as:", stored.content)

        # A second chat, then a checkpoint, a mistake and a restore.
        side = await engine.create_chat("ada-1", "homework", system_prompt="Grade strictly.")
        await engine.add_message("ada-1", "user", "Is 2 + 2 == 4?", chat_id=side.chat_id)
        saved = await engine.checkpoint("ada-1", "before clearing")
        await engine.clear_messages("ada-1")
        await engine.set_metadata("ada-1", "level", "lost")
        await engine.restore_checkpoint("ada-1", saved.checkpoint_id)
        print(
            f"restored {await engine.count_messages('ada-1')} messages,"
            f" level={await engine.get_metadata('ada-1', 'level')!r}"
        )

        # Export to a JSON file and import it back under a new id.
        path = directory / "ada-1.json"
        path.write_text(json.dumps(await engine.export_session("ada-1"), indent=2))
        copy = await engine.import_session(json.loads(path.read_text()), new_session_id="ada-2")
        stats = await engine.get_session_stats(copy.session_id)
        print(
            f"imported {copy.session_id}: {stats.chat_count} chats,"
            f" {stats.total_messages} messages, tags={copy.tags}"
        )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(main(Path(tmp)))
