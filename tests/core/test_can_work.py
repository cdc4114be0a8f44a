"""One rule of "the session can work" (ctxengine.lifecycle), and its SQL translation
(storage/repositories/sessions.py: CAN_WORK, live, stale), agree: evaluated in the
database on stored sessions and in Python on the sessions read back, for any status,
last activity, idle timeout (or none), deadline (or none) and instant, at the exact
boundaries too (hypothesis)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import Double, bindparam, case, delete, insert, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from ctxengine.lifecycle import (
    OPEN_STATUSES,
    SessionStatus,
    can_work,
    epoch,
    idle_deadline,
    is_live,
    is_stale,
)
from ctxengine.models import Session
from ctxengine.storage.repositories.sessions import CAN_WORK, TOUCHED, live, stale
from ctxengine.storage.schema import sessions as t

TENANT = "can-work"
MICROSECOND = timedelta(microseconds=1)

# -- the rule alone --------------------------------------------------------------------


@dataclass(frozen=True)
class Timed:
    status: SessionStatus
    last_activity: datetime
    idle_timeout: float | None
    expires_at: datetime | None


T0 = datetime(2030, 1, 1, 12, 0, 0, 123457, tzinfo=UTC)


def test_idle_exactly_its_timeout_is_still_live() -> None:
    assert idle_deadline(T0, None) is None
    assert idle_deadline(T0, 600.0) == epoch(T0) + 600.0
    assert is_live(T0, 600.0, None, T0 + timedelta(seconds=600))
    assert not is_live(T0, 600.0, None, T0 + timedelta(seconds=600) + MICROSECOND)
    assert is_live(T0, None, None, T0 + timedelta(days=10_000))


def test_the_deadline_itself_is_past() -> None:
    assert is_live(T0, None, T0 + MICROSECOND, T0)
    assert not is_live(T0, None, T0, T0)


def test_only_active_sessions_work_and_only_open_ones_go_stale() -> None:
    past = T0 - timedelta(hours=1)
    for status in SessionStatus:
        fresh = Timed(status, T0, 60.0, None)
        idle = Timed(status, past, 60.0, None)
        assert can_work(fresh, T0) is (status is SessionStatus.ACTIVE)
        assert not can_work(idle, T0)
        assert not is_stale(fresh, T0)
        assert is_stale(idle, T0) is (status in OPEN_STATUSES)


# -- the rule against its SQL, in both databases -----------------------------------------

instants = st.datetimes(
    min_value=datetime(2001, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
)
timeouts = st.one_of(
    st.none(),
    st.sampled_from([0.0, 0.1, 0.3, 1.0, 59.999999, 600.0, 1800.0]),
    st.integers(0, 10**12).map(lambda us: us / 1e6),  # whole microseconds
    st.floats(0.0, 1e9, allow_nan=False, allow_infinity=False),
)
#: Where ``now`` sits: at the idle deadline, at ``expires_at`` or anywhere; then moved
#: by at most a few microseconds, or not at all.
anchors = st.sampled_from(["idle", "expires", "last", "free"])
nudges = st.sampled_from([0, 0, 0, -1, 1, -2, 2]).map(lambda n: n * MICROSECOND)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Timed, datetime]:
    last = draw(instants)
    timeout = draw(timeouts)
    if timeout is not None and timeout > 3e8:  # keep the deadline within datetime's range
        timeout = None
    session = Timed(draw(st.sampled_from(list(SessionStatus))), last, timeout, None)
    if draw(st.booleans()):
        session = Timed(session.status, last, timeout, draw(instants))
    anchor = draw(anchors)
    if anchor == "idle" and timeout is not None:
        now = last + timedelta(seconds=timeout)
    elif anchor == "expires" and session.expires_at is not None:
        now = session.expires_at
    elif anchor == "last":
        now = last
    else:
        now = draw(instants)
    return session, now + draw(nudges)


def _stored(case_: tuple[Timed, datetime], sid: str) -> dict[str, Any]:
    session, _ = case_
    return {
        "tenant_id": TENANT,
        "session_id": sid,
        "user_id": "u",
        "tier": "free",
        "status": session.status.value,
        "name": None,
        "metadata": {},
        "tags": [],
        "preferences": {},
        "created_at": session.last_activity,
        "last_activity": session.last_activity,
        "expires_at": session.expires_at,
        "idle_timeout": session.idle_timeout,
        "idle_deadline": None,
        "request_count": 0,
        "error_count": 0,
        "total_processing_time": 0.0,
        "current_chat_id": None,
        "chat_count": 0,
    }


_NOW = bindparam("now", type_=t.c.expires_at.type)
_NOW_EPOCH: Any = bindparam("now_epoch", type_=Double())
_KEY = (t.c.tenant_id == TENANT, t.c.session_id == bindparam("sid"))
#: The deadline set as by every write that records activity (in SQL).
_TOUCH = update(t).where(*_KEY).values(**TOUCHED)
_JUDGED = select(
    *(c for c in t.c if c.name not in ("idle_deadline", "idle_bucket")),
    case((CAN_WORK, True), else_=False).label("can_work"),
    case((live(_NOW, _NOW_EPOCH), True), else_=False).label("live"),
    case((stale(_NOW, _NOW_EPOCH), True), else_=False).label("stale"),
).where(*_KEY)


async def _judge(url: str, batch: list[tuple[Timed, datetime]]) -> list[tuple[Any, datetime]]:
    """Store each case as a session, touched at its last activity by the touch's own SQL;
    then read it back with the SQL verdicts at its instant."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(delete(t).where(t.c.tenant_id == TENANT))
            for n, case_ in enumerate(batch):
                last = case_[0].last_activity
                await conn.execute(insert(t).values(_stored(case_, f"s{n}")))
                await conn.execute(_TOUCH, {"sid": f"s{n}", "now": last, "now_epoch": epoch(last)})
        judged = []
        async with engine.connect() as conn:
            for n, (_, now) in enumerate(batch):
                params = {"sid": f"s{n}", "now": now, "now_epoch": epoch(now)}
                judged.append(((await conn.execute(_JUDGED, params)).one(), now))
        return judged
    finally:
        await engine.dispose()


def test_sql_and_python_agree_on_which_sessions_can_work(db_url: str) -> None:
    at = T0 + timedelta(seconds=0.3)

    @settings(
        max_examples=100,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(batch=st.lists(cases(), min_size=1, max_size=25))
    @example(  # the boundaries, exactly and a microsecond either side
        batch=[
            (Timed(status, T0, timeout, expires), at + nudge)
            for status, timeout, expires, nudge in itertools.product(
                SessionStatus,
                (0.3, 0.299999, None),
                (None, at),
                (-MICROSECOND, timedelta(0), MICROSECOND),
            )
        ]
    )
    def check(batch: list[tuple[Timed, datetime]]) -> None:
        for row, now in asyncio.run(_judge(db_url, batch)):
            values = row._mapping
            fields = {k: values[k] for k in Session.model_fields if k in values}
            # the Python rule, on the session as the engine reads it back
            session = Session(**fields, observed_at=now)
            alive = is_live(session.last_activity, session.idle_timeout, session.expires_at, now)
            assert bool(values["can_work"]) is can_work(session, now), (session, now)
            assert bool(values["live"]) is alive, (session, now)
            assert bool(values["stale"]) is not alive, (session, now)
            assert session.is_expired() is (
                session.status is SessionStatus.EXPIRED or is_stale(session, now)
            )

    check()
