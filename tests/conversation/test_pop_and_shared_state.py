"""pop_message takes the true last message; shared state documents merge in SQL."""

from __future__ import annotations

import asyncio

import pytest

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import ChatNotFoundError, SessionNotFoundError, ValidationError


async def test_pop_returns_the_newest_message(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    assert await engine.pop_message("s") is None
    await engine.add_messages("s", [{"role": "user", "content": c} for c in "abc"])
    popped = await engine.pop_message("s")
    assert popped is not None and (popped.seq, popped.content) == (3, "c")
    assert [m.content for m in await engine.get_messages("s")] == ["a", "b"]
    assert await engine.count_messages("s") == 2
    with pytest.raises(ChatNotFoundError):
        await engine.pop_message("s", chat_id="missing")
    with pytest.raises(SessionNotFoundError):
        await engine.pop_message("nobody")


async def test_concurrent_pops_and_appends_lose_and_duplicate_nothing(
    db_url: str,
) -> None:
    settings = EngineSettings(auto_cleanup=False, max_messages_per_chat=None)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.create_session("s", "u")
        await engine.add_messages("s", [{"role": "user", "content": f"seed{i}"} for i in range(40)])

        async def append(w: int) -> None:
            for i in range(10):
                await engine.add_message("s", "user", f"w{w}-{i}")

        async def pop() -> list[str]:
            taken = []
            for _ in range(10):
                message = await engine.pop_message("s")
                if message is not None:
                    taken.append(message.content)
            return taken

        results = await asyncio.gather(*(append(w) for w in range(4)), *(pop() for _ in range(4)))
        popped = [c for r in results if r for c in r]
        remaining = [m.content for m in await engine.get_messages("s", limit=None)]
        written = {f"seed{i}" for i in range(40)} | {
            f"w{w}-{i}" for w in range(4) for i in range(10)
        }
        assert len(popped) == len(set(popped)) == 40
        assert sorted(popped + remaining) == sorted(written)
        assert await engine.count_messages("s") == len(remaining) == 40


async def test_shared_state(engine: ContextEngine) -> None:
    assert await engine.get_shared_state("app:travel") == {}
    assert await engine.update_shared_state("app:travel", {"a": 1}) == {"a": 1}
    assert await engine.update_shared_state("app:travel", {"b": [1]}) == {"a": 1, "b": [1]}
    await asyncio.gather(
        *(engine.update_shared_state("app:travel", {f"k{i}": i}) for i in range(20))
    )
    state = await engine.get_shared_state("app:travel")
    assert state == {"a": 1, "b": [1], **{f"k{i}": i for i in range(20)}}
    assert await engine.tenant("other").get_shared_state("app:travel") == {}
    with pytest.raises(ValidationError):
        await engine.update_shared_state("app:travel", {"bad": float("nan")})
    with pytest.raises(ValidationError):
        await engine.update_shared_state("", {"a": 1})


async def test_shared_state_may_not_grow_past_the_limit(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, max_metadata_bytes=60)
    async with ContextEngine(db_url, settings=settings) as engine:
        await engine.update_shared_state("k", {"a": "x" * 20})
        with pytest.raises(ValidationError, match="max_metadata_bytes"):
            await engine.update_shared_state("k", {"b": "y" * 30})
        assert await engine.get_shared_state("k") == {"a": "x" * 20}
