"""``ctxengine demo``: a realistic agent workload on the embedded default."""

from __future__ import annotations

import asyncio
import random

from .engine import ContextEngine
from .models import Event, QuotaType
from .settings import EngineSettings


async def _answer(prompt: str) -> str:
    """A stand-in for a model call."""
    await asyncio.sleep(random.uniform(0.005, 0.02))
    if "fail" in prompt:
        raise RuntimeError("the model timed out")
    return f"answer to {prompt!r}"


async def run_demo(url: str | None = None) -> None:
    """Create sessions for a few users, track requests, pause/resume, end one, let the
    idle ones expire through the background cleanup task, print statistics."""
    settings = EngineSettings(session_timeout=1.0, cleanup_interval=0.2)
    async with ContextEngine(url, settings=settings) as engine:
        health = await engine.health_check()
        print(f"ctxengine demo on {health['backend']} (schema {health['schema_revision']})")

        def show(event: Event) -> None:
            who = f" {event.session_id[:13]}…" if event.session_id else ""
            detail = f" {event.data}" if event.type == "cleanup.completed" else ""
            print(f"  event  {event.type:<18}{who}{detail}")

        engine.subscribe(
            show,
            "session.created",
            "session.paused",
            "session.resumed",
            "session.ended",
            "session.expired",
            "cleanup.completed",
        )

        users = ["ada", "grace", "linus"]
        sessions = {
            u: await engine.create_session(
                user_id=u,
                tier="basic",
                tags=["demo"],
                metadata={"source": "cli"},
                system_prompt="You are a travel assistant.",
            )
            for u in users
        }
        print(f"created {len(sessions)} sessions for {', '.join(users)}")

        for user, session in sessions.items():
            for prompt in ("hello", "plan a trip", "summarize"):
                await engine.add_message(session.session_id, "user", prompt)
                async with engine.track_request(session.session_id, "chat"):
                    answer = await _answer(prompt)
                await engine.add_message(session.session_id, "assistant", answer, tokens=120)
                await engine.track_usage(session.session_id, "chat", QuotaType.TOKENS, 120)
            print(f"  {user}: 3 requests tracked, 7 messages in the conversation")

        ada = sessions["ada"].session_id
        try:
            async with engine.track_request(ada, "chat"):
                await _answer("please fail")
        except RuntimeError as exc:
            print(f"  ada: one request failed ({exc}); it is counted as an error")

        grace = sessions["grace"].session_id
        await engine.pause_session(grace)
        await engine.resume_session(grace)
        print("  grace: paused and resumed")

        linus = sessions["linus"].session_id
        await engine.end_session(linus, "completed")
        print("  linus: session completed")

        print("waiting for the idle sessions to expire (timeout 1 s, sweep every 0.2 s)…")
        await asyncio.sleep(1.8)

        for session in await engine.list_sessions(tags=["demo"], limit=len(users)):
            print(
                f"  {session.user_id:<6} {session.status.value:<10} "
                f"requests={session.request_count} errors={session.error_count} "
                f"avg={session.average_processing_time * 1000:.1f} ms"
            )

        stats = await engine.get_statistics()
        print("statistics:")
        print(f"  sessions: {stats.total_sessions} {stats.sessions_by_status}")
        print(
            f"  requests: {stats.total_requests}, errors: {stats.total_errors} "
            f"(error rate {stats.error_rate:.1%})"
        )
        print(f"  average processing time: {stats.average_processing_time * 1000:.1f} ms")
        print(f"  messages: {stats.total_messages}")
        print(f"  usage: {stats.usage_by_resource}")
