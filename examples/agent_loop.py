"""An async agent loop: sessions created on first request, every call tracked.

Several users talk to a stand-in model at once; each turn runs inside
``track_request`` so requests, errors and time are recorded exactly.

    python examples/agent_loop.py
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from pathlib import Path

from ctxengine import ContextEngine, EngineSettings, QuotaType


async def model(prompt: str) -> tuple[str, int]:
    """A stand-in for an LLM call: an answer and the tokens it used."""
    await asyncio.sleep(random.uniform(0.001, 0.01))
    if random.random() < 0.1:
        raise TimeoutError("model timed out")
    return f"echo: {prompt}", len(prompt.split()) * 3


async def handle_turn(engine: ContextEngine, user_id: str, prompt: str) -> str:
    session = await engine.get_or_create_session(f"chat-{user_id}", user_id, tier="basic")
    try:
        async with engine.track_request(session.session_id, "chat"):
            answer, tokens = await model(prompt)
    except TimeoutError:
        return "(sorry, try again)"
    await engine.track_usage(session.session_id, "chat", QuotaType.TOKENS, tokens)
    return answer


async def main(url: str) -> None:
    random.seed(7)
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        users = ["ada", "grace", "linus", "barbara"]

        async def conversation(user: str) -> None:
            for turn in range(5):
                await handle_turn(engine, user, f"question {turn} from {user}")
                await asyncio.sleep(0.2)  # stay inside the basic tier's 10 calls/second

        await asyncio.gather(*(conversation(u) for u in users))
        for user in users:
            s = await engine.get_session(f"chat-{user}")
            assert s is not None
            tokens = await engine.get_quota(s.session_id, QuotaType.TOKENS)
            print(
                f"{user:<8} requests={s.request_count} errors={s.error_count} "
                f"avg={s.average_processing_time * 1000:.1f} ms tokens={tokens.used:g}"
            )
        stats = await engine.get_statistics()
        print(f"total: {stats.total_requests} requests, error rate {stats.error_rate:.0%}")


if __name__ == "__main__":
    url = os.environ.get("CTXENGINE_DATABASE_URL")
    if url:
        asyncio.run(main(url))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"sqlite+aiosqlite:///{Path(tmp) / 'agents.db'}"))
