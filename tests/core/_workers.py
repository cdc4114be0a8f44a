"""Code run in spawned child processes by the concurrency tests."""

from __future__ import annotations

import asyncio

from ctxengine import ContextEngine, EngineSettings
from ctxengine.errors import SessionLimitError, SessionNotActiveError

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False)


def update(url: str, session_id: str, tasks: int, calls: int, seconds: float) -> None:
    """``tasks`` coroutines times ``calls`` update_session calls each."""

    async def main() -> None:
        async with ContextEngine(url, settings=SETTINGS) as engine:

            async def worker() -> None:
                for i in range(calls):
                    await engine.update_session(
                        session_id,
                        increment_requests=True,
                        add_processing_time=seconds,
                        mark_error=i % 10 == 0,
                    )

            await asyncio.gather(*(worker() for _ in range(tasks)))

    asyncio.run(main())


def update_until_ended(url: str, session_id: str, calls: int) -> tuple[int, int]:
    """Update until the session is ended by someone else: (accepted, refused)."""

    async def main() -> tuple[int, int]:
        accepted = refused = 0
        async with ContextEngine(url, settings=SETTINGS) as engine:
            for _ in range(calls):
                try:
                    await engine.update_session(session_id, increment_requests=True)
                    accepted += 1
                except SessionNotActiveError:
                    refused += 1
        return accepted, refused

    return asyncio.run(main())


def create_many(
    url: str, user_id: str, attempts: int, per_user: int | None, total: int | None
) -> int:
    """Try to create sessions under limits; how many this process created."""

    async def main() -> int:
        settings = EngineSettings(
            auto_cleanup=False,
            auto_migrate=False,
            max_sessions_per_user=per_user,
            max_active_sessions=total,
        )
        created = 0
        async with ContextEngine(url, settings=settings) as engine:

            async def attempt() -> None:
                nonlocal created
                try:
                    await engine.create_session(user_id=user_id)
                    created += 1
                except SessionLimitError:
                    pass

            await asyncio.gather(*(attempt() for _ in range(attempts)))
        return created

    return asyncio.run(main())


def get_or_create(url: str, session_id: str, tasks: int) -> int:
    """get_or_create_session from many coroutines; how many calls returned."""

    async def main() -> int:
        async with ContextEngine(url, settings=SETTINGS) as engine:
            results = await asyncio.gather(
                *(engine.get_or_create_session(session_id, "u") for _ in range(tasks))
            )
        return len({r.session_id for r in results})

    return asyncio.run(main())


def sweep(url: str, batch: int, start_at: float) -> int:
    """One cleanup_inactive_sessions (nobody listening) at ``start_at`` (a time.time()),
    in batches of ``batch``."""
    import time

    from ctxengine.services import sessions

    sessions._EXPIRE_BATCH = batch  # many batches, to interleave with other sweepers

    async def main() -> int:
        async with ContextEngine(url, settings=SETTINGS) as engine:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            return await engine.cleanup_inactive_sessions(max_idle_seconds=60)

    return asyncio.run(main())
