"""Quotas and usage: exact across processes, refusals write nothing, events once."""

from __future__ import annotations

import math
import multiprocessing
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, QuotaStatus, QuotaType
from ctxengine.errors import QuotaExceededError, SessionNotFoundError, ValidationError

from . import _workers


async def scalar(engine: ContextEngine, sql: str, **params: Any) -> Any:
    async with engine._store.engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def test_quota_is_exact_across_processes(engine: ContextEngine, db_url: str) -> None:
    session = await engine.create_session(user_id="u")
    await engine.set_quota(session.session_id, QuotaType.TOKENS, 1000)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        accepted = sum(pool.starmap(_workers.spend, [(db_url, session.session_id, 4, 20, 7.0)] * 4))
    # 4 x 4 x 20 x 7 = 2240 offered: the quota fills up to the last multiple of 7.
    assert accepted == 7 * (1000 // 7)
    used = await scalar(engine, "SELECT used FROM ctx_quotas WHERE resource_type = 'tokens'")
    recorded = await scalar(engine, "SELECT SUM(amount) FROM ctx_usage_records")
    assert used == recorded == accepted
    status = await engine.get_quota(session.session_id, QuotaType.TOKENS)
    assert status.used == accepted and status.remaining == 1000 - accepted


async def test_refused_usage_writes_nothing(engine: ContextEngine) -> None:
    session = await engine.create_session(user_id="u")
    await engine.track_usage(session.session_id, "chat", QuotaType.API_CALLS, 999)
    before = await engine.get_session(session.session_id)
    with pytest.raises(QuotaExceededError) as info:
        await engine.track_usage(session.session_id, "chat", QuotaType.API_CALLS, 2)
    err = info.value
    assert (err.resource_type, err.used, err.limit, err.requested) == ("api_calls", 999, 1000, 2)
    after = await engine.get_session(session.session_id)
    assert after is not None and before is not None
    assert after.last_activity == before.last_activity
    assert await scalar(engine, "SELECT COUNT(*) FROM ctx_usage_records") == 1
    assert (await engine.get_quota(session.session_id, "api_calls")).used == 999


@pytest.mark.parametrize("amount", [0, -1, math.nan, math.inf, "3", True])
async def test_bad_amounts_are_refused(engine: ContextEngine, amount: Any) -> None:
    session = await engine.create_session(user_id="u")
    with pytest.raises(ValidationError):
        await engine.track_usage(session.session_id, "op", QuotaType.TOKENS, amount)
    assert await scalar(engine, "SELECT COUNT(*) FROM ctx_usage_records") == 0
    assert await scalar(engine, "SELECT COUNT(*) FROM ctx_quotas") == 0


async def test_unknown_or_gauge_resource_types_are_refused(engine: ContextEngine) -> None:
    session = await engine.create_session(user_id="u")
    for resource in ("gold", QuotaType.CONCURRENT_REQUESTS):
        with pytest.raises(ValidationError):
            await engine.track_usage(session.session_id, "op", resource, 1)
    with pytest.raises(ValidationError):
        await engine.set_quota(session.session_id, QuotaType.TOKENS, -5)
    with pytest.raises(SessionNotFoundError):
        await engine.track_usage("nope", "op", QuotaType.TOKENS, 1)
    assert await scalar(engine, "SELECT COUNT(*) FROM ctx_quotas") == 0


async def test_threshold_events_fire_once_per_crossing(engine: ContextEngine) -> None:
    events: list[str] = []
    engine.subscribe(
        lambda e: events.append(e.type), "quota.warning", "quota.critical", "quota.exceeded"
    )
    records = []
    engine.add_usage_callback(records.append)
    session = await engine.create_session(user_id="u")
    await engine.set_quota(session.session_id, QuotaType.TOKENS, 100)
    for _ in range(10):
        await engine.track_usage(session.session_id, "gen", QuotaType.TOKENS, 10)
    with pytest.raises(QuotaExceededError):
        await engine.track_usage(session.session_id, "gen", QuotaType.TOKENS, 1)
    assert events == ["quota.warning", "quota.critical", "quota.exceeded"]
    assert len(records) == 10 and records[0].amount == 10


async def test_a_custom_quota_may_be_above_the_tiers(engine: ContextEngine) -> None:
    """A new quota row takes the tier's limit; a custom row's limit, higher or lower,
    is the one applied from then on."""
    custom = (await engine.create_session(user_id="u", tier="free")).session_id
    await engine.set_quota(custom, QuotaType.API_CALLS, 5000)  # the free tier gives 1000
    record = await engine.track_usage(custom, "batch", QuotaType.API_CALLS, 3000)
    assert (record.amount, record.user_id) == (3000, "u")
    with pytest.raises(QuotaExceededError):
        await engine.track_usage(custom, "batch", QuotaType.API_CALLS, 2001)
    assert (await engine.get_quota(custom, QuotaType.API_CALLS)).used == 3000
    plain = (await engine.create_session(user_id="u", tier="free")).session_id
    with pytest.raises(QuotaExceededError) as refused:
        await engine.track_usage(plain, "batch", QuotaType.API_CALLS, 1001)
    assert (refused.value.used, refused.value.limit) == (0, 1000)
    assert (
        await scalar(engine, "SELECT COUNT(*) FROM ctx_quotas WHERE session_id = :s", s=plain) == 0
    )
    assert await scalar(engine, "SELECT COUNT(*) FROM ctx_usage_records") == 1


async def test_tiers_set_quota_and_change_tier(engine: ContextEngine) -> None:
    session = await engine.create_session(user_id="u", tier="free")
    sid = session.session_id
    quotas = await engine.get_quota(sid)
    assert set(quotas) == set(QuotaType)
    assert quotas[QuotaType.API_CALLS] == QuotaStatus.of(0, 1000)
    await engine.track_usage(sid, "call", QuotaType.API_CALLS, 500)
    await engine.set_quota(sid, QuotaType.TOKENS, 10)
    upgraded = await engine.change_tier(sid, "pro")
    assert upgraded.tier == "pro"
    api = await engine.get_quota(sid, QuotaType.API_CALLS)
    assert (api.used, api.limit, api.usage_percentage) == (500, 25_000, 2.0)
    assert (await engine.get_quota(sid, QuotaType.TOKENS)).limit == 10  # custom survives
    await engine.change_tier(sid, "enterprise")
    unlimited = await engine.get_quota(sid, QuotaType.API_CALLS)
    assert (unlimited.limit, unlimited.remaining, unlimited.usage_percentage) == (None, None, 0.0)
    with pytest.raises(ValidationError):
        await engine.change_tier(sid, "platinum")


async def test_history_prediction_and_analytics(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=10_000)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        session = await engine.create_session(user_id="ana")
        sid = session.session_id
        for op, amount in [("chat", 100), ("chat", 200), ("embed", 50)]:
            await engine.track_usage(sid, op, QuotaType.TOKENS, amount)
            clock.advance(600)
        history = await engine.get_usage_history(user_id="ana")
        assert [r.amount for r in history] == [50, 200, 100]  # newest first
        assert len(await engine.get_usage_history(session_id=sid, operation="chat")) == 2
        forecast = await engine.predict_quota_exhaustion(sid, lookback=3600)
        tokens = forecast[QuotaType.TOKENS]
        assert tokens["rate_per_hour"] == pytest.approx(350.0)
        assert tokens["hours_to_exhaustion"] == pytest.approx((100_000 - 350) / 350)
        assert forecast[QuotaType.API_CALLS]["predicted_exhaustion"] is None
        analytics = await engine.get_user_analytics("ana")
        assert analytics.total_operations == 3
        assert analytics.operation_breakdown == {"chat": 2, "embed": 1}
        assert analytics.resource_usage == {QuotaType.TOKENS: 350}
        assert analytics.most_used_operation == "chat"
        stats = await engine.get_statistics()
        assert stats.usage_by_resource == {"tokens": 350}


async def test_tenants_do_not_share_quotas(engine: ContextEngine) -> None:
    acme, other = engine.tenant("acme"), engine.tenant("other")
    await acme.create_session("s", "u")
    await other.create_session("s", "u")
    await acme.set_quota("s", QuotaType.TOKENS, 5)
    await acme.track_usage("s", "op", QuotaType.TOKENS, 5)
    with pytest.raises(QuotaExceededError):
        await acme.track_usage("s", "op", QuotaType.TOKENS, 1)
    await other.track_usage("s", "op", QuotaType.TOKENS, 50)
    assert (await other.get_quota("s", QuotaType.TOKENS)).used == 50
    assert len(await other.get_usage_history()) == 1
    with pytest.raises(SessionNotFoundError):
        await engine.track_usage("s", "op", QuotaType.TOKENS, 1)


async def test_message_tokens_do_not_draw_on_the_tokens_quota(engine: ContextEngine) -> None:
    """docs/concepts/quotas-and-limits.md: ``add_message(..., tokens=n)`` stores ``n`` on
    the message and nothing else; only ``track_usage`` counts against TOKENS."""
    usage: list[Any] = []
    engine.subscribe(usage.append, "usage.recorded")
    await engine.create_session("s", "u", tier="free")
    message = await engine.add_message("s", "assistant", "an answer", tokens=500)
    assert message.tokens == 500
    assert (await engine.get_messages("s"))[0].tokens == 500
    tokens = await engine.get_quota("s", QuotaType.TOKENS)
    assert tokens.used == 0 and tokens.limit == 100_000
    assert await scalar(engine, "SELECT COUNT(*) FROM ctx_usage_records") == 0
    assert (await engine.get_statistics()).usage_by_resource == {}
    assert usage == []
    await engine.track_usage("s", "llm", QuotaType.TOKENS, 500)  # what the docs say to do
    assert (await engine.get_quota("s", QuotaType.TOKENS)).used == 500
    assert [e.data["record"].amount for e in usage] == [500]
