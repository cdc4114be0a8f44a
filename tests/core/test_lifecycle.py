"""The state machine: allowed moves, lazy expiry, and a stateful model test."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ctxengine import ContextEngine, EngineSettings, Event, SessionStatus
from ctxengine.errors import (
    InvalidTransitionError,
    SessionExpiredError,
    SessionNotActiveError,
    ValidationError,
)
from tests.fixtures import FakeClock

END = ("completed", "failed", "expired")
TIMEOUT = 100.0


def lazy_settings() -> EngineSettings:
    return EngineSettings(auto_cleanup=False, session_timeout=TIMEOUT)


async def test_allowed_moves(engine: ContextEngine) -> None:
    events: list[tuple[str, str | None]] = []
    engine.subscribe(lambda e: events.append((e.type, e.session_id)))
    await engine.create_session("s", "u")
    assert (await engine.pause_session("s")).status is SessionStatus.PAUSED
    with pytest.raises(SessionNotActiveError) as info:
        await engine.update_session("s", increment_requests=True)
    assert info.value.status == "paused"
    with pytest.raises(InvalidTransitionError):
        await engine.pause_session("s")
    assert (await engine.resume_session("s")).status is SessionStatus.ACTIVE
    with pytest.raises(InvalidTransitionError) as bad:
        await engine.resume_session("s")
    assert (bad.value.current, bad.value.requested) == ("active", "active")
    ended = await engine.end_session("s")
    assert ended.status is SessionStatus.COMPLETED and ended.ended_at is not None
    again = await engine.end_session("s", "completed")  # same status: unchanged
    assert again.ended_at == ended.ended_at
    for target in ("failed", "expired"):
        with pytest.raises(InvalidTransitionError):
            await engine.end_session("s", target)
    for call in (engine.pause_session("s"), engine.resume_session("s")):
        with pytest.raises(InvalidTransitionError):
            await call
    with pytest.raises(SessionNotActiveError):
        await engine.touch("s")
    assert [t for t, _ in events] == [
        "session.created",
        "session.paused",
        "session.resumed",
        "session.ended",
    ]


@pytest.mark.parametrize("status", ["active", "paused", "sleeping", "", None])
async def test_end_needs_an_end_status(engine: ContextEngine, status: Any) -> None:
    await engine.create_session("s", "u")
    with pytest.raises(ValidationError):
        await engine.end_session("s", status)
    assert (await engine.get_session("s")).status is SessionStatus.ACTIVE  # type: ignore[union-attr]


async def test_paused_sessions_can_end(engine: ContextEngine) -> None:
    await engine.create_session("s", "u")
    await engine.pause_session("s")
    assert (await engine.end_session("s", "failed")).status is SessionStatus.FAILED


async def test_idle_sessions_expire_lazily(db_url: str, clock: FakeClock) -> None:
    async with ContextEngine(db_url, settings=lazy_settings(), clock=clock) as engine:
        events: list[Event] = []
        engine.subscribe(events.append, "session.expired")
        await engine.create_session("idle", "u")
        clock.advance(TIMEOUT)  # exactly the timeout: not yet idle *longer* than it
        await engine.touch("idle")
        clock.advance(TIMEOUT + 0.001)
        read = await engine.get_session("idle")  # reads never change state
        assert read is not None and read.status is SessionStatus.ACTIVE
        assert read.is_expired(TIMEOUT) and read.idle_seconds == pytest.approx(TIMEOUT + 0.001)
        with pytest.raises(SessionExpiredError):
            await engine.update_session("idle", increment_requests=True)
        with pytest.raises(SessionExpiredError):
            await engine.touch("idle")
        stored = await engine.get_session("idle")
        assert stored is not None and stored.status is SessionStatus.EXPIRED
        assert stored.request_count == 0
        assert [e.session_id for e in events] == ["idle"]  # announced once


async def test_transitions_on_idle_sessions_see_them_expired(db_url: str, clock: FakeClock) -> None:
    async with ContextEngine(db_url, settings=lazy_settings(), clock=clock) as engine:
        for sid in ("p", "r", "c", "x"):
            await engine.create_session(sid, "u")
        await engine.pause_session("r")
        clock.advance(TIMEOUT * 2)
        with pytest.raises(InvalidTransitionError) as info:
            await engine.pause_session("p")
        assert (info.value.current, info.value.requested) == ("expired", "paused")
        with pytest.raises(InvalidTransitionError):
            await engine.resume_session("r")
        with pytest.raises(InvalidTransitionError):
            await engine.end_session("c", "completed")
        assert (await engine.end_session("x", "expired")).status is SessionStatus.EXPIRED
        statuses = {s.session_id: s.status for s in await engine.list_sessions()}
        assert set(statuses.values()) == {SessionStatus.EXPIRED}


async def test_deadlines_expire_sessions(db_url: str, clock: FakeClock) -> None:
    async with ContextEngine(db_url, settings=lazy_settings(), clock=clock) as engine:
        session = await engine.create_session(
            "d", "u", expires_at=clock.now + __import__("datetime").timedelta(seconds=5)
        )
        assert not session.is_expired()
        clock.advance(5)
        with pytest.raises(SessionExpiredError):
            await engine.touch("d")


async def test_a_clock_stepped_back_gives_no_negative_ages(db_url: str, clock: FakeClock) -> None:
    """A clock stepped back an hour after creation: every snapshot reads idle and age 0.0
    (never negative), and the session is not expired (issue 16 §8)."""
    async with ContextEngine(db_url, settings=lazy_settings(), clock=clock) as engine:
        await engine.create_session("back", "u")
        clock.advance(-3600)
        read = await engine.get_session("back")
        assert read is not None
        (listed,) = await engine.list_sessions()
        touched = await engine.touch("back")
        updated = await engine.update_session("back", increment_requests=True)
        for snapshot in (read, listed, touched, updated):
            assert snapshot.observed_at < snapshot.created_at  # the clock did step back
            assert snapshot.idle_seconds == 0.0 and snapshot.age_seconds == 0.0
            assert snapshot.status is SessionStatus.ACTIVE and not snapshot.is_expired()
        assert updated.request_count == 1


class LifecycleMachine(RuleBasedStateMachine):
    """Drive the real engine and a model of the SPEC's diagram side by side."""

    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.clock = FakeClock()
        self.engine = ContextEngine(self.url, settings=lazy_settings(), clock=self.clock)
        self.runner.run(self.engine.initialize())
        self.model: dict[str, dict[str, Any]] = {}
        self.names = (f"s{n}" for n in itertools.count())
        self.expired_events = 0
        self.engine.subscribe(self._count_expired, "session.expired")

    def _count_expired(self, _: Event) -> None:
        self.expired_events += 1

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def teardown(self) -> None:
        self.run(self.engine.close())
        self.runner.close()

    @initialize()
    def clean(self) -> None:
        for session in self.run(self.engine.list_sessions(limit=1000)):
            self.run(self.engine.delete_session(session.session_id))

    def idle(self, sid: str) -> bool:
        return (self.clock.now - self.model[sid]["last"]).total_seconds() > TIMEOUT

    def settle(self, sid: str) -> str:
        """The status a call sees: open + idle counts as expired (and becomes it)."""
        m = self.model[sid]
        if m["status"] in ("active", "paused") and self.idle(sid):
            m["status"] = "expired"
            m["announced"] += 1
        return str(m["status"])

    @rule()
    def create(self) -> None:
        sid = next(self.names)
        self.run(self.engine.create_session(sid, "u"))
        self.model[sid] = {
            "status": "active",
            "last": self.clock.now,
            "requests": 0,
            "announced": 0,
        }

    def pick(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model)))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def work(self, data: st.DataObject) -> None:
        sid = self.pick(data)
        status = self.settle(sid)
        if status == "active":
            session = self.run(self.engine.update_session(sid, increment_requests=True))
            self.model[sid]["requests"] += 1
            self.model[sid]["last"] = self.clock.now
            assert session.request_count == self.model[sid]["requests"]
        else:
            expected = SessionExpiredError if status == "expired" else SessionNotActiveError
            with pytest.raises(expected):
                self.run(self.engine.update_session(sid, increment_requests=True))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), goal=st.sampled_from(["paused", "active", *END]))
    def move(self, data: st.DataObject, goal: str) -> None:
        target = goal
        sid = self.pick(data)
        current = self.settle(sid)
        allowed = {
            "active": {"paused", *END},
            "paused": {"active", *END},
        }.get(current, set())
        if target in allowed:
            if target == "paused":
                result = self.run(self.engine.pause_session(sid))
            elif target == "active":
                result = self.run(self.engine.resume_session(sid))
            else:
                result = self.run(self.engine.end_session(sid, target))
            if target in ("paused", "active"):
                self.model[sid]["last"] = self.clock.now
            if target == "expired":
                self.model[sid]["announced"] += 1
            self.model[sid]["status"] = target
            assert result.status == target
        elif current == target and target in END:
            assert self.run(self.engine.end_session(sid, target)).status == target
        else:
            call = (
                self.engine.pause_session(sid)
                if target == "paused"
                else self.engine.resume_session(sid)
                if target == "active"
                else self.engine.end_session(sid, target)
            )
            with pytest.raises(InvalidTransitionError):
                self.run(call)

    @rule(seconds=st.sampled_from([1.0, TIMEOUT / 2, TIMEOUT + 1]))
    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        expected = 0
        for sid in self.model:
            before = self.model[sid]["status"]
            if self.settle(sid) == "expired" and before != "expired":
                expected += 1
        assert self.run(self.engine.cleanup_inactive_sessions()) == expected

    @invariant()
    def stored_statuses_match(self) -> None:
        stored = {s.session_id: s for s in self.run(self.engine.list_sessions(limit=1000))}
        assert set(stored) == set(self.model)
        for sid, m in self.model.items():
            status = stored[sid].status.value
            if m["status"] == "expired" and status != "expired":
                # an open session the model settled lazily without a call on it
                assert status in ("active", "paused") and self.idle(sid)
            else:
                assert status == m["status"], sid
        # every move to expired was announced exactly once
        assert self.expired_events == sum(m["announced"] for m in self.model.values())


def test_lifecycle_state_machine(db_url: str) -> None:
    LifecycleMachine.url = db_url
    run = LifecycleMachine.TestCase
    run.settings = settings(
        max_examples=12,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    run().runTest()
