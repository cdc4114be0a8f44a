"""The session state machine, as pure data: the statuses, which transitions are
allowed, and when a session can work. No IO.

"A session can work" is defined here once. ``storage/repositories/sessions.py`` builds
its SQL form (``CAN_WORK``, ``live``, ``stale``) from the same pieces — the statuses of
:data:`WORKING_STATUSES` and the bounds of :data:`LIFE` — so the guarded statements and
the Python checks (``can_work``, ``Session.is_expired``) decide alike; a property test
(tests/core/test_can_work.py) checks them against each other in both databases.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, NamedTuple, Protocol


class SessionStatus(StrEnum):
    """Lifecycle states of a session (re-exported by :mod:`ctxengine.models`)."""

    ACTIVE = "active"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


ACTIVE = SessionStatus.ACTIVE
PAUSED = SessionStatus.PAUSED

#: Statuses that still hold a session open (they count toward session limits).
OPEN_STATUSES: frozenset[SessionStatus] = frozenset({ACTIVE, PAUSED})
#: Final statuses: nothing leaves them.
END_STATUSES: frozenset[SessionStatus] = frozenset(
    {SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.EXPIRED}
)

_ALLOWED: dict[SessionStatus, frozenset[SessionStatus]] = {
    ACTIVE: frozenset({PAUSED}) | END_STATUSES,
    PAUSED: frozenset({ACTIVE}) | END_STATUSES,
    SessionStatus.COMPLETED: frozenset(),
    SessionStatus.FAILED: frozenset(),
    SessionStatus.EXPIRED: frozenset(),
}


def sources_of(target: SessionStatus) -> frozenset[SessionStatus]:
    """The statuses from which a session may move to ``target``."""
    return frozenset(src for src, targets in _ALLOWED.items() if target in targets)


def can_transition(current: SessionStatus, target: SessionStatus) -> bool:
    """Whether the diagram allows ``current`` → ``target``."""
    return target in _ALLOWED[current]


# -- when a session can work ------------------------------------------------------------
#
# A session can work (take messages, usage, rate-limited calls, leases; be touched)
# when its status is in WORKING_STATUSES and it is *live* at the instant ``now``: within
# every bound of LIFE. An open session that is not live is *stale*: whoever finds it
# first moves it to expired.

#: The statuses in which a session can work.
WORKING_STATUSES: frozenset[SessionStatus] = frozenset({ACTIVE})


class Bound(NamedTuple):
    """One bound on a session's life. The session is within it while its value of
    ``column`` (a column of ``ctx_sessions``) is None — no such bound — or
    ``within(value, instant)`` holds, ``instant`` naming the form of ``now`` compared:
    ``"now"`` (the datetime) or ``"now_epoch"`` (:func:`epoch` of it). ``within`` is an
    operator of the :mod:`operator` module, so it applies to values here and to SQL
    columns in storage alike."""

    column: str
    within: Callable[[Any, Any], Any]
    instant: str


#: A session is live while it has been idle no longer than its ``idle_timeout`` (its
#: idle deadline, ``last_activity + idle_timeout`` in seconds since the epoch, is not
#: before now) and ``expires_at`` has not come.
LIFE: tuple[Bound, ...] = (
    Bound("idle_deadline", operator.ge, "now_epoch"),
    Bound("expires_at", operator.gt, "now"),
)


def epoch(moment: datetime) -> float:
    """``moment`` as seconds since the epoch: the unit of the idle deadline."""
    return moment.timestamp()


def idle_deadline(last_activity: datetime, idle_timeout: float | None) -> float | None:
    """The idle deadline of a session last active at ``last_activity`` (None: never
    idle), as stored: every write that records activity sets it to ``epoch(now) +
    idle_timeout`` in the same statement, in double precision, which the databases and
    Python compute alike (so the comparisons agree to the last bit)."""
    return None if idle_timeout is None else epoch(last_activity) + idle_timeout


def is_live(
    last_activity: datetime,
    idle_timeout: float | None,
    expires_at: datetime | None,
    now: datetime,
) -> bool:
    """Whether a session is within every bound of :data:`LIFE` at ``now``."""
    values = {"idle_deadline": idle_deadline(last_activity, idle_timeout), "expires_at": expires_at}
    instants = {"now": now, "now_epoch": epoch(now)}
    for bound in LIFE:
        value = values[bound.column]
        if value is not None and not bound.within(value, instants[bound.instant]):
            return False
    return True


class Timed(Protocol):
    """What the rule reads of a session (a :class:`~ctxengine.models.Session` has it)."""

    @property
    def status(self) -> SessionStatus: ...
    @property
    def last_activity(self) -> datetime: ...
    @property
    def idle_timeout(self) -> float | None: ...
    @property
    def expires_at(self) -> datetime | None: ...


def can_work(session: Timed, now: datetime) -> bool:
    """Whether ``session`` can work at ``now``: its status is a working one, and it is live."""
    return session.status in WORKING_STATUSES and is_live(
        session.last_activity, session.idle_timeout, session.expires_at, now
    )


def is_stale(session: Timed, now: datetime) -> bool:
    """Whether ``session`` is open but no longer live at ``now`` (due to expire)."""
    return session.status in OPEN_STATUSES and not is_live(
        session.last_activity, session.idle_timeout, session.expires_at, now
    )
