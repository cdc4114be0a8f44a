"""Code run in spawned child processes by the compaction concurrency test."""

from __future__ import annotations

import asyncio
import json
import random
import time

from ctxengine import ContextEngine, EngineSettings, Message
from ctxengine.errors import ConflictError

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False, max_messages_per_chat=None)


async def summarize(messages: list[Message]) -> str:
    """A summary that says exactly what it replaced: the previous summary by seq, each
    other message by content; slow enough for compactions to overlap."""
    await asyncio.sleep(random.uniform(0.005, 0.03))
    return json.dumps(
        [
            {"summary": m.seq} if "summary_of" in m.metadata else {"message": m.content}
            for m in messages
        ]
    )


def append_and_compact(
    url: str, session_id: str, writer: str, turns: int, compactions: int, start_at: float
) -> tuple[int, int]:
    """From ``start_at`` one task appends ``turns`` turns (user, assistant, tool) while
    another compacts ``compactions`` times keeping 1 or 2 turns; (compactions
    committed, compactions that lost to another)."""

    async def main() -> tuple[int, int]:
        committed = lost = 0
        async with ContextEngine(url, settings=SETTINGS) as engine:
            await asyncio.sleep(max(start_at - time.time(), 0))

            async def append() -> None:
                for t in range(turns):
                    await engine.add_messages(
                        session_id,
                        [
                            {"role": "user", "content": f"{writer}/{t}/user"},
                            {"role": "assistant", "content": f"{writer}/{t}/call"},
                            {"role": "tool", "content": f"{writer}/{t}/result"},
                        ],
                    )
                    await asyncio.sleep(random.uniform(0, 0.01))

            async def compact() -> None:
                nonlocal committed, lost
                for i in range(compactions):
                    try:
                        summary = await engine.compact_history(
                            session_id, summarize, keep_last_turns=1 + i % 2
                        )
                    except ConflictError:
                        lost += 1
                    else:
                        committed += summary is not None
                    await asyncio.sleep(random.uniform(0, 0.02))

            await asyncio.gather(append(), compact())
        return committed, lost

    return asyncio.run(main())
