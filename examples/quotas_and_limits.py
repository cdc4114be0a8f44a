"""Tiers, quotas, usage, rate limits and concurrency on ctxengine.

The reference SDK's QuotaManager, CustomRateLimiter, with_concurrency_control and
SessionAnalytics, each in a few lines. Runs against a temporary SQLite file, or the
database in CTXENGINE_DATABASE_URL.

    python examples/quotas_and_limits.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ctxengine import ContextEngine, EngineSettings, QuotaType, UsageRecord
from ctxengine.errors import ConcurrencyLimitError, QuotaExceededError, RateLimitError

T = TypeVar("T")


async def check_quota_status(engine: ContextEngine, session_id: str) -> list[str]:
    """QuotaManager.check_quota_status: quotas at or above 75 % / 90 %."""
    warnings = []
    for kind, status in (await engine.get_quota(session_id)).items():
        if status.usage_percentage >= 90:
            warnings.append(f"{kind}: {status.usage_percentage:.1f}% used")
        elif status.usage_percentage >= 75:
            warnings.append(f"{kind}: {status.usage_percentage:.1f}% used (warning)")
    return warnings


async def safe_api_call(
    engine: ContextEngine, session_id: str, call: Callable[[], Awaitable[T]]
) -> T:
    """safe_api_call: rate limit, run, record one API call."""
    await engine.enforce_rate_limit(session_id, "api_call")
    result = await call()
    await engine.track_usage(session_id, "api_call", QuotaType.API_CALLS, 1)
    return result


async def process_file(engine: ContextEngine, session_id: str, name: str) -> str:
    """with_concurrency_control: hold a concurrency slot while the work runs."""
    async with engine.concurrency_slot(session_id, "file_processing"):
        await asyncio.sleep(0.05)
        return f"processed {name}"


async def main(url: str) -> None:
    async with ContextEngine(url, settings=EngineSettings(auto_cleanup=False)) as engine:
        session = await engine.create_session(
            user_id="user123", tier="free", metadata={"department": "research"}
        )
        sid = session.session_id
        print(f"session {sid} (tier {session.tier})")

        # Usage callbacks and quota tracking.
        def usage_alert(record: UsageRecord) -> None:
            print(f"  usage: {record.operation} used {record.amount:g} {record.resource_type}")

        engine.add_usage_callback(usage_alert)
        engine.subscribe(
            lambda e: print(f"  event {e.type}: {e.data}"),
            "quota.warning",
            "quota.critical",
            "quota.exceeded",
        )
        await engine.track_usage(sid, "send_message", QuotaType.API_CALLS, 1)
        await engine.track_usage(sid, "file_upload", QuotaType.STORAGE, 1024)
        await engine.track_usage(sid, "ai_inference", QuotaType.TOKENS, 80_000)
        print("quota warnings:", await check_quota_status(engine, sid))
        try:
            await engine.track_usage(sid, "ai_inference", QuotaType.TOKENS, 30_000)
        except QuotaExceededError as exc:
            print(f"refused: used {exc.used:g} of {exc.limit:g}, asked {exc.requested:g}")

        # Predicted exhaustion, at the consumption rate of the last hour.
        tokens = (await engine.predict_quota_exhaustion(sid))[QuotaType.TOKENS]
        print(
            f"tokens: {tokens['rate_per_hour']:g}/h, exhausted at {tokens['predicted_exhaustion']}"
        )

        # Rate limits: the tier's per-minute rule, and a custom one (CustomRateLimiter).
        print(await safe_api_call(engine, sid, lambda: asyncio.sleep(0, "hello")))
        await engine.set_rate_limit(sid, "file_upload", 5, 60)
        allowed = 0
        for _ in range(7):
            try:
                await engine.enforce_rate_limit(sid, "file_upload")
                allowed += 1
            except RateLimitError as exc:
                print(f"file_upload limited: retry after {exc.retry_after:.1f}s")
                break
        print(f"file uploads allowed: {allowed}")

        # Concurrency: the free tier runs 2 operations at once.
        results = await asyncio.gather(
            *(process_file(engine, sid, f"file_{i}.txt") for i in range(4)),
            return_exceptions=True,
        )
        for result in results:
            print(
                "  ", "concurrency limit" if isinstance(result, ConcurrencyLimitError) else result
            )

        # Upgrading changes the limits now; usage so far is kept.
        await engine.change_tier(sid, "pro")
        tokens_status = await engine.get_quota(sid, QuotaType.TOKENS)
        print(f"after upgrade: tokens {tokens_status.used:,.0f} of {tokens_status.limit:,.0f}")

        # SessionAnalytics.
        analytics = await engine.get_user_analytics("user123")
        usage = {str(kind): amount for kind, amount in analytics.resource_usage.items()}
        print(
            f"analytics: {analytics.total_operations} operations, "
            f"most used: {analytics.most_used_operation}, usage: {usage}"
        )
        stats = await engine.get_statistics()
        print(f"system: {stats.total_sessions} sessions, usage {stats.usage_by_resource}")


if __name__ == "__main__":
    url = os.environ.get("CTXENGINE_DATABASE_URL")
    if url:
        asyncio.run(main(url))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(main(f"sqlite+aiosqlite:///{Path(tmp) / 'example.db'}"))
