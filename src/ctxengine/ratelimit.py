"""The rate-limit rule: sub-window counts with bounded state and no window over the limit.

A window ``W`` is cut into ``SUBWINDOWS`` (60) sub-windows of ``W/60``. The state of a
key is the count of each of the last 61 sub-windows. At time ``t`` (sub-window ``b``)
the counts of sub-windows ``b-60 … b`` are added up — the partly elapsed oldest one in
full — and a call of ``cost`` is admitted when that sum plus ``cost`` stays within
``max_calls``.

Every window ``(s - W, s]`` lies inside the 61 sub-windows counted at the last call
admitted in it, so no window of length ``W``, anywhere in time, ever holds more than
``max_calls``. The price: a call may be refused early, by at most one sub-window
(``W/60``): after a burst of ``max_calls`` at one instant, ``retry_after`` lies in
``(W, W * 61/60]`` (the upper end rounded up to the microsecond). State stays at most
61 counts whatever ``max_calls`` is. Times are handled in whole microseconds (an engine
clock's resolution), so with an injected clock a call at ``now + retry_after`` is
admitted and one a microsecond earlier is not.

Clocks that disagree: a count stored at most ``ahead(W)`` = max(``CLOCK_SKEW``, W/60)
ahead of the clock (another process's clock runs a little ahead) still counts, in full,
as if made now: nothing is uncounted early, and the waits may then be longer by up to
that much. A count stored further ahead comes from a clock that stepped back: it no
longer counts, so after a step back ``retry_after`` and ``reset_after`` stay within
``W * 61/60`` instead of growing by the step. (The PostgreSQL function
``ctx_rate_limit_take`` leaves every state ahead of its clock to this rule.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUBWINDOWS = 60
_SPAN = SUBWINDOWS + 1  # sub-windows counted at any instant
_US = 1_000_000
#: Seconds by which the clocks of processes sharing a database may disagree: a stored
#: time further ahead than this (and than one sub-window for a rate limit, than the
#: lease TTL for a lease) comes from a clock that stepped back.
CLOCK_SKEW = 1.0


@dataclass(frozen=True, slots=True)
class LimiterState:
    """Counts of the newest sub-windows: ``counts[-1]`` belongs to sub-window ``newest``."""

    newest: int = 0
    counts: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_json(cls, data: Any) -> LimiterState:
        """Read the stored form (None or ``{}`` = no calls)."""
        if not data:
            return cls()
        return cls(int(data["b"]), tuple(map(int, data["c"])))

    def to_json(self) -> dict[str, Any]:
        """The compact stored form."""
        return {"b": self.newest, "c": list(self.counts)}

    def subwindows(self) -> dict[int, int]:
        """sub-window → count, for those with calls."""
        first = self.newest - len(self.counts) + 1
        return {first + i: n for i, n in enumerate(self.counts) if n}

    def window(self, current: int) -> dict[int, int]:
        """sub-window → count, for the sub-windows counted when ``current`` is current
        (none later)."""
        return {sub: n for sub, n in self.subwindows().items() if current - _SPAN < sub <= current}


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer for one call.

    ``remaining`` is ``max_calls`` minus what is counted after the decision (a peek
    consumes nothing, so it does not subtract ``cost``); ``reset_after`` is the time until
    the oldest counted sub-window stops counting (0.0 when none counts); ``retry_after``
    is 0.0 when allowed, else the smallest wait after which this call is admitted.
    """

    allowed: bool
    remaining: int
    reset_after: float
    retry_after: float
    state: LimiterState


def in_us(seconds: float) -> int:
    """A time in whole microseconds, as the rule reckons it."""
    return round(seconds * _US)


def decide(
    state: LimiterState,
    now: float,
    max_calls: int,
    window: float,
    cost: int = 1,
    *,
    consume: bool = True,
) -> Decision:
    """Admit or refuse a call of ``cost`` at ``now`` (seconds); refusals change nothing.

    ``consume=False`` peeks: the same answer, the state unchanged. Raises ValueError
    when ``cost`` exceeds ``max_calls`` (it could never be admitted), and for a cost or
    ``max_calls`` below 1, a window that is not a finite positive number, or a
    non-finite ``now``.
    """
    if cost < 1 or max_calls < 1:
        raise ValueError(f"cost and max_calls must be >= 1, got {cost} and {max_calls}")
    if cost > max_calls:
        raise ValueError(f"cost {cost} exceeds max_calls {max_calls}")
    if not (math.isfinite(window) and window > 0) or not math.isfinite(now):
        raise ValueError(f"window must be finite and > 0 and now finite: {window}, {now}")
    window_us = max(in_us(window), 1)
    now_us = in_us(now)
    current = (now_us * SUBWINDOWS) // window_us
    if state.counts and state.newest > current:
        # Counts ahead of the clock: within the skew, counted from the newest of them
        # on (nothing uncounted early); further, from a clock that stepped back.
        latest = current + _ahead(window_us)
        current = max([current, *(sub for sub in state.subwindows() if sub <= latest)])
    counted = state.window(current)
    used = sum(counted.values())

    def leaves_at(sub: int) -> float:
        """Seconds from now until sub-window ``sub`` stops counting."""
        end_us = -((-(sub + _SPAN) * window_us) // SUBWINDOWS)  # ceil
        return max(end_us - now_us, 0) / _US

    oldest_leaves = leaves_at(min(counted)) if counted else 0.0
    if used + cost <= max_calls:
        new_state = state
        if consume:
            counted[current] = counted.get(current, 0) + cost
            first = current - _SPAN + 1
            new_state = LimiterState(
                current, tuple(counted.get(first + i, 0) for i in range(_SPAN))
            )
            new_state = _trim(new_state)
            oldest_leaves = leaves_at(min(counted))
        return Decision(
            True, max_calls - used - (cost if consume else 0), oldest_leaves, 0.0, new_state
        )
    freed = 0
    retry = 0.0
    for sub in sorted(counted):
        freed += counted[sub]
        if used - freed + cost <= max_calls:
            retry = leaves_at(sub)
            break
    return Decision(False, max(max_calls - used, 0), oldest_leaves, retry, state)


def _ahead(window_us: int) -> int:
    """How many sub-windows ahead of the clock a count still counts: CLOCK_SKEW, at
    least one sub-window."""
    return max(1, -((-round(CLOCK_SKEW * _US) * SUBWINDOWS) // window_us))


def _trim(state: LimiterState) -> LimiterState:
    """Drop leading empty sub-windows (keeps the stored form small)."""
    counts = state.counts
    start = 0
    while start < len(counts) - 1 and counts[start] == 0:
        start += 1
    return LimiterState(state.newest, counts[start:])
