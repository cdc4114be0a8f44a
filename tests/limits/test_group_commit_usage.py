"""Group commit of track_usage: concurrent calls share statements (on PostgreSQL), each
caller keeps its own record, its own error and its own threshold events, and quotas
stay exact, never overshot."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, QuotaType, UsageRecord
from ctxengine.errors import QuotaExceededError, SessionNotActiveError, SessionNotFoundError
from ctxengine.settings import DEFAULT_TIERS
from ctxengine.storage.group import SOLO


async def rows(engine: ContextEngine, sql: str, **params: Any) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list(await conn.execute(text(sql), params))


async def quota_row(
    engine: ContextEngine, session_id: str, resource: QuotaType
) -> tuple[float, float | None]:
    found = await rows(
        engine,
        "SELECT used, quota_limit FROM ctx_quotas WHERE session_id = :s AND resource_type = :r",
        s=session_id,
        r=resource.value,
    )
    assert len(found) == 1
    return found[0][0], found[0][1]


async def assert_stored(engine: ContextEngine, records: list[UsageRecord]) -> None:
    """Every record returned is in the database as returned, and no other is."""
    stored = {
        row[0]: row[1:]
        for row in await rows(
            engine,
            "SELECT record_id, session_id, user_id, resource_type, amount, metadata "
            "FROM ctx_usage_records",
        )
    }
    assert len(stored) == len(records)
    for r in records:
        metadata = stored[r.record_id][4]
        if isinstance(metadata, str):  # SQLite's JSON text
            metadata = json.loads(metadata)
        assert stored[r.record_id][:4] == (r.session_id, r.user_id, r.resource_type, r.amount)
        assert metadata == r.metadata


def shared(records: list[UsageRecord]) -> bool:
    """Whether some records were written by one transaction (one batch): the same
    created_at, the instant of their transaction."""
    return len({r.created_at for r in records}) < len(records)


async def test_a_quota_admits_exactly_its_limit_across_64_tasks(engine: ContextEngine) -> None:
    """64 tasks spend 1 each from a quota of 40: exactly 40 are recorded, 24 refused,
    and the counter is 40, never above."""
    session = await engine.create_session("hot", "u")
    await engine.set_quota("hot", QuotaType.API_CALLS, 40)
    outcomes = await asyncio.gather(
        *(
            engine.track_usage("hot", "op", QuotaType.API_CALLS, metadata={"i": i, "x": 0.1})
            for i in range(64)
        ),
        return_exceptions=True,
    )
    records = [o for o in outcomes if isinstance(o, UsageRecord)]
    refused = [o for o in outcomes if isinstance(o, QuotaExceededError)]
    assert (len(records), len(refused)) == (40, 24)
    assert all(e.limit == 40 and e.requested == 1 for e in refused)
    assert await quota_row(engine, "hot", QuotaType.API_CALLS) == (40, 40)
    assert all(r.user_id == session.user_id for r in records)
    await assert_stored(engine, records)
    assert shared(records)


async def test_64_tasks_on_sessions_of_their_own(engine: ContextEngine) -> None:
    """Each session's new quota row gets its tier's limit and its own amount."""
    for i in range(64):
        await engine.create_session(f"own-{i}", f"u{i}", tier="basic")
    records = await asyncio.gather(
        *(engine.track_usage(f"own-{i}", "op", QuotaType.TOKENS, i + 1) for i in range(64))
    )
    assert [(r.session_id, r.user_id, r.amount) for r in records] == [
        (f"own-{i}", f"u{i}", i + 1) for i in range(64)
    ]
    for i in range(64):
        assert await quota_row(engine, f"own-{i}", QuotaType.TOKENS) == (i + 1, 500_000)
    await assert_stored(engine, records)
    assert shared(records)


async def test_mixed_resources_and_tiers_get_their_own_limits(engine: ContextEngine) -> None:
    """One batch over sessions of every tier and several resource types: each new quota
    row is created with its tier's limit for its resource (unlimited for enterprise)."""
    tiers = DEFAULT_TIERS
    amounts = {QuotaType.API_CALLS: 1.0, QuotaType.TOKENS: 10.0, QuotaType.STORAGE: 100.0}
    for tier in tiers:
        await engine.create_session(tier, "u", tier=tier)
    calls = [(tier, resource) for _ in range(4) for tier in tiers for resource in amounts]
    records = await asyncio.gather(
        *(engine.track_usage(tier, "op", resource, amounts[resource]) for tier, resource in calls)
    )
    assert [(r.session_id, r.resource_type) for r in records] == calls
    for tier, policy in tiers.items():
        for resource, amount in amounts.items():
            limit = policy.quotas[resource]
            assert await quota_row(engine, tier, resource) == (4 * amount, limit)
    await assert_stored(engine, records)
    # a batch wrote records of several sessions and resources
    written_together = Counter(r.created_at for r in records)
    kinds: dict[Any, set[tuple[str, str]]] = {}
    for r in records:
        kinds.setdefault(r.created_at, set()).add((r.session_id, r.resource_type))
    assert any(len(kinds[at]) > 1 for at, n in written_together.items() if n > 1)


async def test_a_refused_caller_fails_alone(engine: ContextEngine) -> None:
    """Beside calls that fit: an ended session, a missing one, a call over a custom
    quota (the call after it on that quota still fits, and is recorded), and a call
    over its tier's limit on a new quota row each get their own error; nothing is
    written for them."""
    for name in ("a", "b", "ended"):
        await engine.create_session(name, "u", tier="free")
    await engine.end_session("ended")
    await engine.set_quota("a", QuotaType.TOKENS, 10)

    outcomes = await asyncio.gather(
        *(engine.track_usage("a", "op", QuotaType.API_CALLS) for _ in range(5)),
        engine.track_usage("ended", "op", QuotaType.API_CALLS),
        engine.track_usage("missing", "op", QuotaType.API_CALLS),
        engine.track_usage("a", "op", QuotaType.TOKENS, 3),
        engine.track_usage("a", "op", QuotaType.TOKENS, 3),
        engine.track_usage("a", "op", QuotaType.TOKENS, 100),
        engine.track_usage("a", "op", QuotaType.TOKENS, 3),
        engine.track_usage("b", "op", QuotaType.TOKENS, 100_001),  # the free tier: 100 000
        *(engine.track_usage("b", "op", QuotaType.API_CALLS) for _ in range(5)),
        return_exceptions=True,
    )

    assert isinstance(outcomes[5], SessionNotActiveError)
    assert isinstance(outcomes[6], SessionNotFoundError)
    over_custom, over_tier = outcomes[9], outcomes[11]
    assert isinstance(over_custom, QuotaExceededError)
    assert (over_custom.limit, over_custom.requested) == (10, 100)
    assert isinstance(over_tier, QuotaExceededError)
    assert (over_tier.used, over_tier.limit, over_tier.requested) == (0, 100_000, 100_001)
    refused = {5, 6, 9, 11}
    written = [o for i, o in enumerate(outcomes) if i not in refused]
    records = [o for o in written if isinstance(o, UsageRecord)]
    assert records == written
    assert await quota_row(engine, "a", QuotaType.API_CALLS) == (5, 1000)
    assert await quota_row(engine, "a", QuotaType.TOKENS) == (9, 10)
    assert await quota_row(engine, "b", QuotaType.API_CALLS) == (5, 1000)
    assert not await rows(
        engine, "SELECT 1 FROM ctx_quotas WHERE session_id = 'b' AND resource_type = 'tokens'"
    )
    assert not await rows(engine, "SELECT 1 FROM ctx_quotas WHERE session_id = 'ended'")
    await assert_stored(engine, records)


async def test_thresholds_are_announced_once_each_across_batches(engine: ContextEngine) -> None:
    """64 tasks fill a quota of 64: each caller's events are computed from the counter
    right after its own amount, so the 75 % crossing is announced once, by the call
    that made it 48, and the 90 % one once, by the call that made it 58."""
    events: list[tuple[str, Any]] = []
    engine.subscribe(
        lambda e: events.append((e.type, e.data.get("used"))),
        "quota.warning",
        "quota.critical",
        "quota.exceeded",
        "usage.recorded",
    )
    await engine.create_session("s", "u")
    await engine.set_quota("s", QuotaType.TOKENS, 64)
    records = await asyncio.gather(
        *(engine.track_usage("s", "op", QuotaType.TOKENS) for _ in range(64))
    )
    await asyncio.sleep(0.05)  # events are delivered after the commit
    assert len(records) == 64
    counts = Counter(kind for kind, _ in events)
    assert counts == {"usage.recorded": 64, "quota.warning": 1, "quota.critical": 1}
    assert ("quota.warning", 48) in events and ("quota.critical", 58) in events
    assert shared(records)


#: What another transaction changes between a batch's snapshot and its locks, and what
#: the batch's two calls (1 each on a quota of 40, used 1; a new row of the free tier's
#: 1000 where there is none) come to once it is retried: (first, second) written,
#: the quota row (used, limit) after them and the number of usage records.
RACES = {
    "the room gone": (
        "UPDATE ctx_quotas SET used = 39 WHERE session_id = 's'",
        True,
        (True, False),
        (40, 40),
        2,
    ),
    "the session ended": (
        "UPDATE ctx_sessions SET status = 'completed' WHERE session_id = 's'",
        True,
        (False, False),
        (1, 40),
        1,
    ),
    "the tier changed": (
        "UPDATE ctx_sessions SET tier = 'pro' WHERE session_id = 's'",
        False,
        (True, True),
        (2, 25_000),
        2,
    ),
}


@pytest.mark.parametrize("race", RACES)
async def test_a_batch_that_finds_a_change_on_the_locked_rows_is_retried(
    pg_url: str, race: str
) -> None:
    """Another transaction changes a session or a quota between the batch's snapshot
    and its locks: the batch aborts and is retried (nothing written twice), and then
    writes only what the change allows (a call it does not write runs alone): never
    over the limit, nothing for an ended session, a new row with the new tier's limit."""
    change, quota_exists, written, after, recorded = RACES[race]
    async with ContextEngine(pg_url, settings=EngineSettings(auto_cleanup=False)) as engine:
        session = await engine.create_session("s", "u", tier="free")
        if quota_exists:
            await engine.set_quota("s", QuotaType.API_CALLS, 40)
            await engine.track_usage("s", "op", QuotaType.API_CALLS)
        usage = engine._runtime().usage
        call: tuple[str, str, str, str, float, dict[str, Any]]
        call = (session.tenant_id, "s", "op", QuotaType.API_CALLS.value, 1.0, {})
        async with engine._store.engine.connect() as other:
            await other.execute(text(change))
            batch = asyncio.ensure_future(usage._track_many([call, call]))
            await asyncio.sleep(0.5)
            assert not batch.done()  # waiting for a lock the other transaction holds
            await other.commit()
        results = await batch
        assert tuple(isinstance(r, UsageRecord) for r in results) == written
        assert all(isinstance(r, UsageRecord) or r is SOLO for r in results)
        assert await quota_row(engine, "s", QuotaType.API_CALLS) == after
        assert len(await rows(engine, "SELECT 1 FROM ctx_usage_records")) == recorded


@pytest.mark.parametrize("amount", [0.1, 0.7])
async def test_fractional_amounts_never_overshoot(engine: ContextEngine, amount: float) -> None:
    """Float amounts: the check in the snapshot and on the locked row add the same sum,
    so the batch neither overshoots nor aborts for ever."""
    await engine.create_session("s", "u")
    await engine.set_quota("s", QuotaType.COMPUTE_TIME, 3)
    outcomes = await asyncio.gather(
        *(engine.track_usage("s", "op", QuotaType.COMPUTE_TIME, amount) for _ in range(40)),
        return_exceptions=True,
    )
    records = [o for o in outcomes if isinstance(o, UsageRecord)]
    assert all(isinstance(o, UsageRecord | QuotaExceededError) for o in outcomes)
    used, limit = await quota_row(engine, "s", QuotaType.COMPUTE_TIME)
    assert limit == 3 and used <= limit
    assert used == pytest.approx(amount * len(records))
    assert used + amount > limit - 1e-9  # full: the calls refused found no room
    await assert_stored(engine, records)
