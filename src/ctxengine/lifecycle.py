"""The session state machine, as pure data: which transitions are allowed."""

from __future__ import annotations

from .models import SessionStatus

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
