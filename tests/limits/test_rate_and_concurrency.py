"""Rate limits and concurrency slots: exact across processes, bounded, recoverable."""

from __future__ import annotations

import asyncio
import bisect
import json
import multiprocessing
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ctxengine import ContextEngine, EngineSettings, RateLimitType
from ctxengine.errors import (
    ConcurrencyLimitError,
    RateLimitError,
    SessionExpiredError,
    SessionNotActiveError,
    ValidationError,
)

from . import _workers

ROOT = Path(__file__).resolve().parents[2]


async def rows(engine: ContextEngine, sql: str) -> list[Any]:
    async with engine._store.engine.connect() as conn:
        return list((await conn.execute(text(sql))).all())


async def test_retry_after_is_exact_with_an_injected_clock(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=10_000)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        sid = (await engine.create_session(user_id="u")).session_id
        await engine.set_rate_limit(sid, "search", 5, 60)
        for left in (4, 3, 2, 1, 0):
            status = await engine.enforce_rate_limit(sid, "search")
            assert (status.limit, status.remaining) == (5, left)
            # the clock stands on a sub-window's start: it stops counting 61 s later
            assert status.reset_after == pytest.approx(61)
        with pytest.raises(RateLimitError) as info:
            await engine.enforce_rate_limit(sid, "search")
        retry = info.value.retry_after
        assert 60 <= retry <= 61 and (info.value.limit, info.value.window) == (5, 60)
        clock.advance(retry - 0.010)
        with pytest.raises(RateLimitError):
            await engine.enforce_rate_limit(sid, "search")
        peek = await engine.check_rate_limit(sid, "search")
        assert peek.remaining == 0 and peek.reset_after == pytest.approx(0.010)
        clock.advance(0.010)
        assert (await engine.enforce_rate_limit(sid, "search")).remaining == 4


async def test_refused_calls_consume_nothing(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=10_000)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        sid = (await engine.create_session(user_id="u")).session_id
        await engine.set_rate_limit(sid, "op", 2, 10)
        await engine.enforce_rate_limit(sid, "op", cost=2)
        before = await rows(engine, "SELECT state FROM ctx_rate_limit_state")
        touched = (await engine.get_session(sid)).last_activity
        events: list[str] = []
        engine.subscribe(lambda e: events.append(e.type), "rate_limit.exceeded")
        for _ in range(5):
            clock.advance(1)
            with pytest.raises(RateLimitError):
                await engine.enforce_rate_limit(sid, "op")
        assert await rows(engine, "SELECT state FROM ctx_rate_limit_state") == before
        assert (await engine.get_session(sid)).last_activity == touched  # not even touched
        assert events == ["rate_limit.exceeded"] * 5
        assert (await engine.check_rate_limit(sid, "op")).remaining == 0


async def test_a_call_under_no_limit_touches_the_session_and_stores_nothing(
    db_url: str, clock: Any
) -> None:
    """No rule and an unlimited tier: the call is admitted, records activity (so it
    keeps the session alive), writes no limiter state, and is refused once the session
    cannot work, as any call. On PostgreSQL this is the one-statement path too."""
    settings = EngineSettings(auto_cleanup=False)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        sid = (
            await engine.create_session(user_id="u", tier="enterprise", idle_timeout=60)
        ).session_id
        for _ in range(3):
            clock.advance(40)  # each call keeps it alive past its 60 s idle timeout
            status = await engine.enforce_rate_limit(sid, "op", cost=7)
            assert (status.limit, status.remaining, status.reset_after) == (None, None, 0.0)
            session = await engine.get_session(sid)
            assert session is not None and session.last_activity == clock.now
        assert await rows(engine, "SELECT * FROM ctx_rate_limit_state") == []
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            await engine.enforce_rate_limit(sid, "op")
        ended = (await engine.create_session(user_id="u", tier="enterprise")).session_id
        await engine.end_session(ended)
        with pytest.raises(SessionNotActiveError):
            await engine.enforce_rate_limit(ended, "op")


async def test_tier_limits_and_bad_input(engine: ContextEngine) -> None:
    sid = (await engine.create_session(user_id="u", tier="free")).session_id
    status = await engine.enforce_rate_limit(sid, limit_type=RateLimitType.PER_SECOND)
    assert (status.limit, status.remaining) == (2, 1)
    unlimited = await engine.tenant("t").create_session(user_id="u", tier="enterprise")
    free_pass = await engine.tenant("t").enforce_rate_limit(unlimited.session_id)
    assert (free_pass.limit, free_pass.remaining) == (None, None)
    for kwargs in ({"cost": 0}, {"cost": 3, "limit_type": "per_second"}, {"limit_type": "x"}):
        with pytest.raises(ValidationError):
            await engine.enforce_rate_limit(sid, **kwargs)
    for max_calls, window in ((-1, 10), (0, 10), (5, 0), (5, float("nan"))):
        with pytest.raises(ValidationError):
            await engine.set_rate_limit(sid, "op", max_calls, window)
    with pytest.raises(ValidationError):
        await engine.set_rate_limit(sid, "op", 5, 10, user_id="u")
    assert await rows(engine, "SELECT * FROM ctx_rate_limit_rules") == []
    await engine.pause_session(sid)
    with pytest.raises(SessionNotActiveError):
        await engine.enforce_rate_limit(sid)


async def test_per_user_limit_is_shared_by_the_users_sessions(engine: ContextEngine) -> None:
    a = (await engine.create_session(user_id="ann")).session_id
    b = (await engine.create_session(user_id="ann")).session_id
    await engine.set_rate_limit(None, "gen", 3, 3600, user_id="ann")
    await engine.enforce_rate_limit(a, "gen", cost=2)
    await engine.enforce_rate_limit(b, "gen")
    with pytest.raises(RateLimitError):
        await engine.enforce_rate_limit(a, "gen")


async def test_a_sessions_own_rule_wins_over_its_users(engine: ContextEngine) -> None:
    own = (await engine.create_session(user_id="ann")).session_id
    sibling = (await engine.create_session(user_id="ann")).session_id
    await engine.set_rate_limit(None, "gen", 1, 3600, user_id="ann")
    await engine.set_rate_limit(own, "gen", 3, 3600)
    for _ in range(3):
        await engine.enforce_rate_limit(own, "gen")
    with pytest.raises(RateLimitError):
        await engine.enforce_rate_limit(own, "gen")
    await engine.enforce_rate_limit(sibling, "gen")  # the user's rule: 1 per hour
    with pytest.raises(RateLimitError):
        await engine.enforce_rate_limit(sibling, "gen")


async def test_a_new_rule_counts_the_windows_past_calls(db_url: str, clock: Any) -> None:
    """The example of docs/concepts/quotas-and-limits.md ("Rate limits"): a session rule
    with a tier's window continues that tier rule's count, changing max_calls keeps the
    count, another window length (or a user's first rule) starts from zero."""
    settings = EngineSettings(auto_cleanup=False, session_timeout=10_000)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        await engine.create_session("s1", "u", tier="free")
        for left in range(59, 54, -1):
            status = await engine.enforce_rate_limit("s1")  # the free tier: 60 per minute
            assert (status.limit, status.remaining) == (60, left)
        await engine.set_rate_limit("s1", "default", 10, 60)
        status = await engine.check_rate_limit("s1")
        assert (status.limit, status.remaining) == (10, 5)  # the minute's calls count
        await engine.set_rate_limit("s1", "default", 20, 60)
        assert (await engine.check_rate_limit("s1")).remaining == 15  # the count is kept
        await engine.set_rate_limit("s1", "default", 10, 30)
        status = await engine.check_rate_limit("s1")
        assert (status.limit, status.remaining) == (10, 10)  # a new 30 s window
        await engine.create_session("s2", "v", tier="free")
        for _ in range(5):
            await engine.enforce_rate_limit("s2")
        await engine.set_rate_limit(None, "default", 10, 60, user_id="v")
        assert (await engine.check_rate_limit("s2")).remaining == 10  # a user's first rule


async def test_rate_limit_is_exact_across_processes(engine: ContextEngine, db_url: str) -> None:
    sid = (await engine.create_session(user_id="u")).session_id
    await engine.set_rate_limit(sid, "search", 30, 3600)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        admitted = sum(pool.starmap(_workers.hammer, [(db_url, sid, 3, 15)] * 4))
    assert admitted == 30  # 180 attempts within one window: exactly the limit
    (state,) = await rows(engine, "SELECT state FROM ctx_rate_limit_state")
    stored = state[0] if not isinstance(state[0], str) else json.loads(state[0])
    assert sum(stored["c"]) == 30 and len(stored["c"]) <= 61


async def test_no_window_admits_more_than_the_limit_across_processes(
    engine: ContextEngine, db_url: str
) -> None:
    sid = (await engine.create_session(user_id="u")).session_id
    limit, window = 8, 0.4
    await engine.set_rate_limit(sid, "burst", limit, window)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        batches = pool.starmap(_workers.admitted_times, [(db_url, sid, 3, 2.0)] * 4)
    times = sorted(t for batch in batches for t in batch)
    assert len(times) >= limit  # the limiter was exercised
    for i, end in enumerate(times):  # every window (end - W, end] ending at an admission
        first = bisect.bisect_right(times, end - window)
        assert i + 1 - first <= limit, f"{i + 1 - first} calls in {window}s ending at {end}"
    (state,) = await rows(engine, "SELECT state FROM ctx_rate_limit_state")
    stored = state[0] if not isinstance(state[0], str) else json.loads(state[0])
    assert len(stored["c"]) <= 61


async def test_concurrency_cap_holds_across_processes(engine: ContextEngine, db_url: str) -> None:
    sid = (await engine.create_session(user_id="u", tier="free")).session_id  # cap 2
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        batches = pool.starmap(_workers.occupy_intervals, [(db_url, sid, 3, 4)] * 4)
    intervals = [iv for batch in batches for iv in batch]
    assert intervals, "no slot was ever obtained"
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    live = peak = 0
    for _, step in edges:
        live += step
        peak = max(peak, live)
    assert peak <= 2
    assert (await engine.get_session(sid)).concurrent_operations == 0  # type: ignore[union-attr]


async def test_slots_expire_when_the_holder_is_killed(engine: ContextEngine, db_url: str) -> None:
    sid = (await engine.create_session(user_id="u", tier="free")).session_id
    code = f"from tests.limits import _workers; _workers.hold_forever({db_url!r}, {sid!r})"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert line.strip() == b"held"
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        assert (await engine.get_session(sid)).concurrent_operations == 1  # type: ignore[union-attr]
        async with engine.concurrency_slot(sid):
            with pytest.raises(ConcurrencyLimitError):  # the dead lease still counts
                async with engine.concurrency_slot(sid):
                    pass
        await asyncio.sleep(1.2)  # the dead holder's lease_ttl is 1 s
        assert (await engine.get_session(sid)).concurrent_operations == 0  # type: ignore[union-attr]
        async with engine.concurrency_slot(sid), engine.concurrency_slot(sid):
            assert (await engine.get_session(sid)).concurrent_operations == 2  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_slots_are_renewed_and_released(db_url: str) -> None:
    settings = EngineSettings(auto_cleanup=False, lease_ttl=0.3)
    async with ContextEngine(db_url, settings=settings) as engine:
        sid = (await engine.create_session(user_id="u", tier="free")).session_id
        async with engine.concurrency_slot(sid):
            await asyncio.sleep(0.8)  # well past the TTL: renewals keep it alive
            assert (await engine.get_session(sid)).concurrent_operations == 1  # type: ignore[union-attr]
        assert await engine.manage_concurrency(sid, "x") == 1
        assert await engine.manage_concurrency(sid, "x") == 2
        with pytest.raises(ConcurrencyLimitError):
            await engine.manage_concurrency(sid, "x")
        assert await engine.manage_concurrency(sid, "x", increment=False) == 1
        await engine.end_session(sid)  # ending a session releases its leases
        assert await rows(engine, "SELECT * FROM ctx_leases") == []


async def test_track_request_applies_the_tier_limits(engine: ContextEngine) -> None:
    sid = (await engine.create_session(user_id="u", tier="free")).session_id  # 2 per second
    async with engine.track_request(sid) as first, engine.track_request(sid):
        assert first.elapsed >= 0
        with pytest.raises(RateLimitError):  # third call in the same second
            async with engine.track_request(sid):
                pass
    session = await engine.get_session(sid)
    assert session is not None and session.request_count == 2
    assert session.concurrent_operations == 0


async def test_tenants_do_not_share_limits_or_slots(engine: ContextEngine) -> None:
    acme, other = engine.tenant("acme"), engine.tenant("other")
    await acme.create_session("s", "u")
    await other.create_session("s", "u")
    await acme.set_rate_limit("s", "op", 1, 3600)
    await acme.enforce_rate_limit("s", "op")
    with pytest.raises(RateLimitError):
        await acme.enforce_rate_limit("s", "op")
    assert (await other.enforce_rate_limit("s", "op")).limit == 60  # tier rule, untouched
    await acme.manage_concurrency("s")
    await acme.manage_concurrency("s")
    assert await other.manage_concurrency("s") == 1


async def test_deleting_and_purging_remove_what_sessions_own(engine: ContextEngine) -> None:
    keep = (await engine.create_session(user_id="u")).session_id
    for sid in (keep, (await engine.create_session(user_id="u")).session_id):
        await engine.set_rate_limit(sid, "op", 5, 60)
        await engine.enforce_rate_limit(sid, "op")
        await engine.track_usage(sid, "op", "tokens", 1)
        await engine.manage_concurrency(sid)
    gone = (await engine.list_sessions())[0].session_id
    assert gone != keep
    assert await engine.delete_session(gone)
    for table in (
        "ctx_rate_limit_rules",
        "ctx_rate_limit_state",
        "ctx_quotas",
        "ctx_usage_records",
        "ctx_leases",
    ):
        assert len(await rows(engine, f"SELECT * FROM {table}")) == 1, table
    await engine.end_session(keep)
    from datetime import UTC, datetime, timedelta

    assert await engine.purge_sessions(ended_before=datetime.now(UTC) + timedelta(days=1)) == 1
    for table in (
        "ctx_rate_limit_rules",
        "ctx_rate_limit_state",
        "ctx_quotas",
        "ctx_usage_records",
        "ctx_leases",
    ):
        assert await rows(engine, f"SELECT * FROM {table}") == [], table


async def test_every_snapshot_counts_only_its_own_sessions_slots(engine: ContextEngine) -> None:
    held = (await engine.create_session(user_id="u")).session_id
    other = engine.tenant("acme")
    elsewhere = (await other.create_session(user_id="u")).session_id
    await engine.manage_concurrency(held)
    await other.manage_concurrency(elsewhere)
    free = (await engine.create_session(user_id="u")).session_id
    # every call that returns a snapshot: from a read, and from each kind of write
    assert (await engine.get_session(free)).concurrent_operations == 0  # type: ignore[union-attr]
    assert (await engine.update_session(free, increment_requests=True)).concurrent_operations == 0
    assert (await engine.touch(free)).concurrent_operations == 0
    assert (await engine.pause_session(free)).concurrent_operations == 0
    assert (await engine.resume_session(free)).concurrent_operations == 0
    assert (await engine.update_session(held)).concurrent_operations == 1
    assert (await engine.touch(held)).concurrent_operations == 1


async def test_expiring_a_session_releases_its_slots(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=60, lease_ttl=3600)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        for sid in ("swept", "lazy"):
            await engine.create_session(sid, "u")
            await engine.manage_concurrency(sid)
        clock.advance(61)
        with pytest.raises(SessionExpiredError):
            await engine.touch("lazy")  # found idle: expired now, its slot released
        assert [r[0] for r in await rows(engine, "SELECT session_id FROM ctx_leases")] == ["swept"]
        assert await engine.cleanup_inactive_sessions() == 1
        assert await rows(engine, "SELECT * FROM ctx_leases") == []
        assert (await engine.get_session("swept")).concurrent_operations == 0  # type: ignore[union-attr]


async def test_a_clock_stepped_back_keeps_rate_limit_waits_within_the_window(
    db_url: str, clock: Any
) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=100_000)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        sid = (await engine.create_session(user_id="u")).session_id
        await engine.set_rate_limit(sid, "search", 5, 60)
        for _ in range(5):
            await engine.enforce_rate_limit(sid, "search")
            await engine.enforce_rate_limit(sid)  # the tier's PER_MINUTE rule (one statement)
        clock.advance(-3600)
        # the counts stored an hour ahead were made before the step: they no longer count
        assert (await engine.check_rate_limit(sid, "search")).reset_after <= 61
        for operation in ("search", "default"):
            status = await engine.enforce_rate_limit(sid, operation)
            assert status.reset_after <= 61
            while True:
                try:
                    status = await engine.enforce_rate_limit(sid, operation)
                except RateLimitError as exc:
                    retry = exc.retry_after
                    break
                assert status.reset_after <= 61
            assert 60 <= retry <= 61
            peek = await engine.check_rate_limit(sid, operation)
            assert peek.remaining == 0 and peek.reset_after == pytest.approx(retry)
        clock.advance(retry)
        await engine.enforce_rate_limit(sid, "search")  # the wait it named was enough
        await engine.enforce_rate_limit(sid)


async def test_a_dead_holders_slot_frees_when_the_clock_steps_back(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=100_000, lease_ttl=30)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        sid = (await engine.create_session(user_id="u")).session_id
        await engine.set_quota(sid, "concurrent_requests", 1)
        assert await engine.manage_concurrency(sid, "op") == 1
        leases = engine._runtime().leases
        for task in leases.held.values():  # the holder dies: nobody renews its lease
            task.cancel()
        leases.held.clear()
        leases.manual.clear()
        with pytest.raises(ConcurrencyLimitError):
            await engine.manage_concurrency(sid, "op")
        assert (await engine.get_session(sid)).concurrent_operations == 1  # type: ignore[union-attr]
        clock.advance(-3600)
        # expiring an hour (+ lease_ttl) ahead, the lease is from before the step: dead
        assert (await engine.get_quota(sid, "concurrent_requests")).used == 0
        assert (await engine.get_session(sid)).concurrent_operations == 0  # type: ignore[union-attr]
        assert [s.concurrent_operations for s in await engine.list_sessions()] == [0]
        async with engine.concurrency_slot(sid, "op"):
            assert (await engine.get_quota(sid, "concurrent_requests")).used == 1
            touched = await engine.update_session(sid, increment_requests=True)
            assert touched.concurrent_operations == 1
            with pytest.raises(ConcurrencyLimitError):  # the cap holds after the step
                await engine.manage_concurrency(sid, "op")
        assert await rows(engine, "SELECT * FROM ctx_leases") == []


async def test_a_live_holder_keeps_its_slot_across_a_step_back(db_url: str, clock: Any) -> None:
    settings = EngineSettings(auto_cleanup=False, session_timeout=100_000, lease_ttl=0.3)
    async with ContextEngine(db_url, settings=settings, clock=clock) as engine:
        sid = (await engine.create_session(user_id="u")).session_id
        await engine.set_quota(sid, "concurrent_requests", 1)
        async with engine.concurrency_slot(sid):
            clock.advance(-3600)
            await asyncio.sleep(0.35)  # renewed (every lease_ttl / 3) from the new time
            assert (await engine.get_quota(sid, "concurrent_requests")).used == 1
            with pytest.raises(ConcurrencyLimitError):
                await engine.manage_concurrency(sid)
