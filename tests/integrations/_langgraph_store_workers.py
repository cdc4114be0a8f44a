"""Code run in spawned child processes by the LangGraph store tests."""

from __future__ import annotations

import asyncio
import time

from ctxengine import ContextEngine, EngineSettings
from ctxengine.embeddings import HashingEmbedder

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)


async def _put(url: str, worker: int, rounds: int, start: float) -> int:
    from ctxengine.integrations.langgraph import ContextEngineStore

    index = {"dims": 32, "embed": HashingEmbedder(32), "fields": ["notes[*]"]}
    async with ContextEngine(url, settings=SETTINGS) as engine:
        store = ContextEngineStore(engine, index=index)  # type: ignore[arg-type]
        await store.aget(("shared",), "profile")  # connected
        await asyncio.sleep(max(0.0, start - time.time()))  # every process at once
        for i in range(rounds):
            # a different number of texts each time: the vectors of one write only
            notes = [f"worker {worker} round {i} note {n}" for n in range(1 + (worker + i) % 3)]
            await store.aput(("shared",), "profile", {"by": worker, "round": i, "notes": notes})
    return rounds


def put(url: str, worker: int, rounds: int, start: float) -> int:
    """``rounds`` puts of the item ("shared",)/"profile" from the time ``start`` on."""
    return asyncio.run(_put(url, worker, rounds, start))
