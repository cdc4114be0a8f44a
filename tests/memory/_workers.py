"""Code run in child processes (spawned) by the memory tests."""

from __future__ import annotations

import asyncio
import time

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import ConflictError

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)


async def _race(url: str, key: str, worker: int, rounds: int, start: float) -> list[int]:
    won: list[int] = []
    async with ContextEngine(url, settings=SETTINGS) as engine:
        await engine.recall(key, user_id="u")  # connected
        await asyncio.sleep(max(0.0, start - time.time()))  # every process at once
        for _ in range(rounds):
            item = await engine.get_memory(key, user_id="u")
            current = 0 if item is None else item.version
            await asyncio.sleep(0.002)  # room for another process to write in between
            try:
                written = await engine.remember(
                    key, {"by": worker, "v": current + 1}, user_id="u", expected_version=current
                )
            except ConflictError:
                await asyncio.sleep(0)
                continue
            assert written.version == current + 1
            won.append(written.version)
    return won


def race(url: str, key: str, worker: int, rounds: int, start: float) -> list[int]:
    """``rounds`` compare-and-set writes of ``key`` from the time ``start`` on, each
    expecting the version just read; the versions this process wrote."""
    return asyncio.run(_race(url, key, worker, rounds, start))
