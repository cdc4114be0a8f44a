"""Code run in spawned child processes by the conversation concurrency tests."""

from __future__ import annotations

import asyncio

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import ChatLimitError, HistoryLimitError

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False, max_messages_per_chat=None)


def append(url: str, session_id: str, writer: str, tasks: int, messages: int) -> int:
    """``tasks`` coroutines each append ``messages`` messages; how many raised."""

    async def main() -> int:
        failures = 0
        async with ContextEngine(url, settings=SETTINGS) as engine:

            async def task(t: int) -> None:
                nonlocal failures
                for i in range(messages):
                    try:
                        await engine.add_message(session_id, "user", f"{writer}/{t}/{i}")
                    except Exception:
                        failures += 1

            await asyncio.gather(*(task(t) for t in range(tasks)))
        return failures

    return asyncio.run(main())


def set_keys(url: str, session_id: str, prefix: str, keys: int) -> None:
    async def main() -> None:
        async with ContextEngine(url, settings=SETTINGS) as engine:
            await asyncio.gather(
                *(engine.set_metadata(session_id, f"{prefix}{i}", i) for i in range(keys))
            )

    asyncio.run(main())


def create_chats(url: str, session_id: str, attempts: int, limit: int) -> int:
    """Try to create chats under max_chats_per_session; how many this process created."""

    async def main() -> int:
        settings = SETTINGS.model_copy(update={"max_chats_per_session": limit})
        created = 0
        async with ContextEngine(url, settings=settings) as engine:

            async def attempt() -> None:
                nonlocal created
                try:
                    await engine.create_chat(session_id)
                    created += 1
                except ChatLimitError:
                    pass

            await asyncio.gather(*(attempt() for _ in range(attempts)))
        return created

    return asyncio.run(main())


def append_under_limit(url: str, session_id: str, tasks: int, messages: int, limit: int) -> int:
    """``tasks`` coroutines each try to append ``messages`` messages to a chat limited to
    ``limit`` (refusing when full); how many were refused. Other errors propagate."""

    async def main() -> int:
        refused = 0
        settings = SETTINGS.model_copy(
            update={"max_messages_per_chat": limit, "history_overflow": "reject"}
        )
        async with ContextEngine(url, settings=settings) as engine:

            async def task() -> None:
                nonlocal refused
                for _ in range(messages):
                    try:
                        await engine.add_message(session_id, "user", "hi")
                    except HistoryLimitError:
                        refused += 1

            await asyncio.gather(*(task() for _ in range(tasks)))
        return refused

    return asyncio.run(main())


def append_trimming(url: str, session_id: str, tasks: int, messages: int, limit: int) -> None:
    """``tasks`` coroutines each append ``messages`` messages to a chat limited to
    ``limit`` that trims its oldest messages; any error propagates."""

    async def main() -> None:
        settings = SETTINGS.model_copy(
            update={"max_messages_per_chat": limit, "history_overflow": "trim"}
        )
        async with ContextEngine(url, settings=settings) as engine:

            async def task() -> None:
                for _ in range(messages):
                    await engine.add_message(session_id, "user", "hi")

            await asyncio.gather(*(task() for _ in range(tasks)))

    asyncio.run(main())


def append_if_last(
    url: str, session_id: str, writer: str, tasks: int, rounds: int, start_at: float
) -> int:
    """From ``start_at`` (epoch seconds, shared by the writers) ``tasks`` coroutines each
    ``rounds`` times read the newest seq and append after it with ``if_last_seq``, the
    seq they saw in the message's metadata; how many lost."""
    import time

    from ctxengine.errors import ConflictError

    async def main() -> int:
        conflicts = 0
        async with ContextEngine(url, settings=SETTINGS) as engine:
            await asyncio.sleep(max(start_at - time.time(), 0))

            async def task(t: int) -> None:
                nonlocal conflicts
                for i in range(rounds):
                    newest = await engine.get_messages(session_id, limit=1)
                    seen = newest[-1].seq if newest else 0
                    try:
                        await engine.add_message(
                            session_id,
                            "user",
                            f"{writer}/{t}/{i}",
                            metadata={"after": seen},
                            if_last_seq=seen,
                        )
                    except ConflictError:
                        conflicts += 1

            await asyncio.gather(*(task(t) for t in range(tasks)))
        return conflicts

    return asyncio.run(main())
