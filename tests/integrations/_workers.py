"""Code run in spawned child processes by the cross-process event tests."""

from __future__ import annotations

import asyncio

from ctxengine import ContextEngine, EngineSettings, Event

SETTINGS = EngineSettings(auto_cleanup=False, auto_migrate=False, cross_process_events=True)


def listen(url: str, name: str, seconds: float) -> list[tuple[str, str | None, str]]:
    """Subscribe, announce readiness by creating session ``name``, then record every
    event until session "stop" ends: (type, session_id, tenant_id)."""

    async def main() -> list[tuple[str, str | None, str]]:
        heard: list[tuple[str, str | None, str]] = []
        done = asyncio.Event()

        def record(event: Event) -> None:
            heard.append((event.type, event.session_id, event.tenant_id))
            if event.type == "session.ended" and event.session_id == "stop":
                done.set()

        async with ContextEngine(url, settings=SETTINGS) as engine:
            engine.subscribe(record)
            await engine.create_session(name, "listener")
            await asyncio.wait_for(done.wait(), seconds)
        return heard

    return asyncio.run(main())


def adk_append_when_current(url: str, writer: str, rounds: int, start_at: float) -> int:
    """From ``start_at`` (epoch seconds, shared by the writers) ``rounds`` times: load
    the ADK session, append an event naming the id of the newest event it saw, with
    on_stale="raise"; how many appends were refused."""
    import time

    from google.adk.errors import StaleSessionError
    from google.adk.events.event import Event as AdkEvent
    from google.genai import types

    from ctxengine.integrations.adk import ContextEngineSessionService

    settings = EngineSettings(auto_cleanup=False, auto_migrate=False)

    async def main() -> int:
        refused = 0
        async with ContextEngine(url, settings=settings) as engine:
            service = ContextEngineSessionService(engine, on_stale="raise")
            await service.get_session(app_name="app", user_id="u", session_id="s")  # connected
            await asyncio.sleep(max(start_at - time.time(), 0))
            for i in range(rounds):
                session = await service.get_session(app_name="app", user_id="u", session_id="s")
                assert session is not None
                seen = session.events[-1].id if session.events else ""
                await asyncio.sleep(0.005)  # room for another writer to append in between
                event = AdkEvent(
                    author="user",
                    invocation_id=f"{writer}-{i}",
                    content=types.Content(role="user", parts=[types.Part(text=seen)]),
                )
                try:
                    await service.append_event(session, event)
                except StaleSessionError:
                    refused += 1
        return refused

    return asyncio.run(main())
