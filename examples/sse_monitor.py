"""A live monitor: a small ASGI app streaming ``engine.events()`` as server-sent events.

Serve it with any ASGI server (``uvicorn sse_monitor:app`` after building ``app`` with
``monitor(engine)``); here it runs in-process against an ASGI client (httpx) while an
agent workload produces events, so the script is self-contained.

    GET /events?types=session.created,message.added&session_id=...&limit=N

    python examples/sse_monitor.py
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx

from ctxengine import ContextEngine, EngineSettings, QuotaType

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def monitor(engine: ContextEngine) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app: ``/events`` streams events until the client goes (or ``limit``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/events":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not found"})
            return
        query = parse_qs(scope["query_string"].decode())
        types = [t for t in query.get("types", [""])[0].split(",") if t]
        session_id = query.get("session_id", [None])[0]
        limit = int(query.get("limit", ["0"])[0]) or None
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        stream = engine.events(*types, session_id=session_id)
        sent = 0
        try:
            async for event in stream:
                frame = f"event: {event.type}\ndata: {json.dumps(event.to_dict())}\n\n"
                await send(
                    {"type": "http.response.body", "body": frame.encode(), "more_body": True}
                )
                sent += 1
                if limit is not None and sent >= limit:
                    break
        finally:
            await stream.aclose()
        await send({"type": "http.response.body", "body": b""})

    return app


async def workload(engine: ContextEngine) -> None:
    """Some agent activity to watch."""
    await asyncio.sleep(0.1)  # let the monitor subscribe first
    await engine.delete_session("trip")  # a fresh start when run again on the same database
    await engine.create_session("trip", "ada", system_prompt="Plan trips.")
    await engine.add_message("trip", "user", "Three days in Lisbon?")
    await engine.add_message("trip", "assistant", "Day 1: Alfama; day 2: Belém; day 3: Sintra.")
    await engine.track_usage("trip", "llm", QuotaType.TOKENS, 420)
    await engine.end_session("trip")


async def main(url: str) -> None:
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        app = monitor(engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://monitor") as client:
            watch = client.get(
                "/events", params={"types": "session.created,message.added,session.ended",
                                   "limit": "4"}
            )  # fmt: skip
            response, _ = await asyncio.gather(watch, workload(engine))
        frames = [f for f in response.text.split("\n\n") if f]
        for frame in frames:
            kind, data = frame.split("\n")
            event = json.loads(data.removeprefix("data: "))
            print(
                f"{kind.removeprefix('event: '):<16} session={event['session_id']} {event['data']}"
            )
        assert response.headers["content-type"] == "text/event-stream"
        assert [f.split("\n")[0] for f in frames] == [
            "event: session.created",
            "event: message.added",
            "event: message.added",
            "event: session.ended",
        ]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        default = f"sqlite+aiosqlite:///{Path(tmp) / 'monitor.db'}"
        asyncio.run(main(os.environ.get("CTXENGINE_DATABASE_URL") or default))
