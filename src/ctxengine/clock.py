"""Time: one source for every decision and every stored time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


def checked(clock: Clock) -> Clock:
    """Wrap ``clock`` so every reading is an aware datetime converted to UTC."""

    def read() -> datetime:
        now = clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise TypeError("the clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    return read
