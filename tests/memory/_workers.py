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


async def _memorize(url: str, session_id: str, start: float) -> int:
    from ctxengine.embeddings import HashingEmbedder

    settings = EngineSettings(auto_cleanup=False, auto_migrate=False, embedder=HashingEmbedder(32))
    async with ContextEngine(url, settings=settings) as engine:
        await engine.count_memories(user_id="u")  # connected
        await asyncio.sleep(max(0.0, start - time.time()))
        return len(await engine.memorize_session(session_id))


def memorize(url: str, session_id: str, start: float) -> int:
    """memorize_session from the time ``start`` on; how many memories it stored."""
    return asyncio.run(_memorize(url, session_id, start))


async def _add_memories(url: str, worker: int, count: int, keep: int, start: float) -> int:
    settings = EngineSettings(auto_cleanup=False, auto_migrate=False, max_memories_per_user=keep)
    async with ContextEngine(url, settings=settings) as engine:
        await engine.count_memories(user_id="u")
        await asyncio.sleep(max(0.0, start - time.time()))

        async def task(number: int) -> int:
            most = 0
            for i in range(count):
                await engine.add_memory(
                    f"{worker}/{number}/{i}",
                    user_id="u",
                    importance=float(i),
                    embedding=[1.0, float(worker)],
                )
                most = max(most, await engine.count_memories(user_id="u"))
            return most

        return max(await asyncio.gather(*(task(n) for n in range(4))))


def add_memories(url: str, worker: int, count: int, keep: int, start: float) -> int:
    """4 tasks adding ``count`` memories each of user "u", of rising importance, under
    a cap of ``keep``, each counting the user's memories after each add; the most any
    count saw."""
    return asyncio.run(_add_memories(url, worker, count, keep, start))


async def _first_vectors(url: str, dimensions: int, spaces: int, start: float) -> list[str]:
    from ctxengine.errors import ValidationError

    outcomes = []
    async with ContextEngine(url, settings=SETTINGS) as engine:
        await engine.count_memories(user_id="u")
        await asyncio.sleep(max(0.0, start - time.time()))
        for space in range(spaces):
            try:
                await engine.add_memory(
                    "first", user_id="u", namespace=f"n{space}", embedding=[1.0] * dimensions
                )
            except ValidationError:
                outcomes.append("refused")
            else:
                outcomes.append("stored")
    return outcomes


def first_vectors(url: str, dimensions: int, spaces: int, start: float) -> list[str]:
    """One memory of ``dimensions`` into each of ``spaces`` namespaces, in turn, from
    the time ``start`` on: "stored" or "refused" for each."""
    return asyncio.run(_first_vectors(url, dimensions, spaces, start))
