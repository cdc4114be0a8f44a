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
