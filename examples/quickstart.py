"""The first steps: create a session, record work, change its state, read it back.

python examples/quickstart.py      # a temporary SQLite file, or $CTXENGINE_DATABASE_URL
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from ctxengine import ContextEngine, EngineSettings


async def main(url: str) -> None:
    async with ContextEngine(url, settings=EngineSettings(session_timeout=600)) as engine:
        session = await engine.create_session(user_id="ada", metadata={"source": "web"})
        sid = session.session_id
        print(f"created {sid} ({session.status})")

        async with engine.track_request(sid, "chat") as request:
            await asyncio.sleep(0.01)  # your model call
        print(f"one request took {request.elapsed * 1000:.0f} ms")

        await engine.update_session(sid, metadata={"topic": "travel"})
        await engine.pause_session(sid)
        await engine.resume_session(sid)
        ended = await engine.end_session(sid, "completed")
        print(f"{ended.status}: {ended.request_count} request(s), metadata {ended.metadata}")

        for s in await engine.list_sessions(user_id="ada"):
            print(f"  {s.session_id} {s.status} age {s.age_seconds:.2f}s")
        print(await engine.get_statistics())


if __name__ == "__main__":
    url = os.environ.get("CTXENGINE_DATABASE_URL")
    if url:
        asyncio.run(main(url))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"sqlite+aiosqlite:///{Path(tmp) / 'quickstart.db'}"))
