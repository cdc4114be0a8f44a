"""Property tests of the pure limiter rule in :mod:`ctxengine.ratelimit` (no database).

Times are kept as whole microseconds on the test side (the engine clock's resolution)
so that window arithmetic here is exact; ``decide`` receives them as float seconds.
"""

from __future__ import annotations

import bisect
import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxengine.ratelimit import CLOCK_SKEW, SUBWINDOWS, Decision, LimiterState, decide

US = 1_000_000
SPAN = SUBWINDOWS + 1
WINDOWS = [0.5, 1.0, 7.3, 60.0, 86_400.0]
STARTS_US = [0, 1_000_000_000 * US, 1_700_000_000_123_456]

windows = st.sampled_from(WINDOWS)
max_calls_st = st.integers(min_value=1, max_value=50)
# A step: how far time moves (as a fraction of the window) and the cost of the call.
fractions = st.one_of(
    st.sampled_from([0.0, 1 / SUBWINDOWS, 59 / 60, 1.0, 61 / 60]),
    st.floats(min_value=0.0, max_value=0.6),
)
plans = st.lists(st.tuples(fractions, st.integers(min_value=1, max_value=50)), max_size=150)


def at(t_us: int) -> float:
    return t_us / US


def bucket(t_us: int, window_us: int) -> int:
    return (t_us * SUBWINDOWS) // window_us


def rule_counted(admitted: list[tuple[int, int]], now_us: int, window_us: int) -> int:
    """The rule, written independently: units in sub-windows b-60 … b."""
    b = bucket(now_us, window_us)
    return sum(c for t, c in admitted if bucket(t, window_us) > b - SPAN)


def longest_wait(window: float) -> float:
    """W * 61/60 rounded up to the microsecond: sub-window ends fall between µs ticks
    when W/60 is not a whole number of µs (W = 0.5 s: 0.508334, not 0.50833…)."""
    return -((-SPAN * round(window * US)) // SUBWINDOWS) / US


def roundtrip(state: LimiterState) -> LimiterState:
    return LimiterState.from_json(json.loads(json.dumps(state.to_json())))


@settings(max_examples=200, deadline=None)
@given(max_calls=max_calls_st, window=windows, plan=plans, start=st.sampled_from(STARTS_US))
def test_replay_keeps_every_guarantee(
    max_calls: int, window: float, plan: list[tuple[float, int]], start: int
) -> None:
    """(1) no window (s-W, s] over the limit, (2) bounded state, (3) refusals consume
    nothing, exact retry_after, (6) liveness, peek = same answer; the rule as specified."""
    window_us = round(window * US)
    state, now_us = LimiterState(), start
    admitted: list[tuple[int, int]] = []
    for fraction, wanted in plan:
        now_us += round(fraction * window_us)
        cost = min(wanted, max_calls)
        now = at(now_us)
        peek = decide(state, now, max_calls, window, cost, consume=False)
        decision = decide(state, now, max_calls, window, cost)
        assert peek.state == state
        assert (peek.allowed, peek.retry_after) == (decision.allowed, decision.retry_after)

        counted = rule_counted(admitted, now_us, window_us)
        assert decision.allowed == (counted + cost <= max_calls)
        if admitted and (now_us - admitted[-1][0]) * SUBWINDOWS >= SPAN * window_us:
            assert decision.allowed  # quiet for W * 61/60: admitted again

        if decision.allowed:
            assert decision.retry_after == 0.0
            assert decision.remaining == max_calls - counted - cost >= 0
            assert peek.remaining == decision.remaining + cost
            assert 0 < decision.reset_after <= longest_wait(window)
            state = decision.state
            admitted.append((now_us, cost))
        else:
            assert decision.state == state  # a refusal consumes nothing
            assert decision.remaining == max(max_calls - counted, 0)
            wait = decision.retry_after
            assert 0 < wait <= longest_wait(window)
            assert decide(state, now + wait, max_calls, window, cost).allowed
            assert not decide(state, now + wait - 1e-6, max_calls, window, cost).allowed
        assert len(state.counts) <= SPAN
        assert roundtrip(state) == state

    times = [t for t, _ in admitted]
    for i, (s, _) in enumerate(admitted):  # every window (s - W, s] ending at an admission
        first = bisect.bisect_right(times, s - window_us)
        assert sum(c for _, c in admitted[first : i + 1]) <= max_calls


def burst(max_calls: int, window: float, now: float) -> tuple[LimiterState, Decision]:
    state = LimiterState()
    for _ in range(max_calls):
        decision = decide(state, now, max_calls, window)
        assert decision.allowed
        state = decision.state
    return state, decide(state, now, max_calls, window)


@settings(max_examples=200, deadline=None)
@given(
    max_calls=max_calls_st,
    window=windows,
    offset_us=st.integers(min_value=0, max_value=86_400 * US),
    start=st.sampled_from(STARTS_US),
)
def test_after_a_burst_retry_after_is_exact_and_at_most_one_subwindow_late(
    max_calls: int, window: float, offset_us: int, start: int
) -> None:
    """(4) refused until now + retry_after, admitted then; W < retry_after <= W * 61/60
    (to the µs)."""
    now = at(start + offset_us)
    state, refused = burst(max_calls, window, now)
    assert not refused.allowed and refused.remaining == 0
    wait = refused.retry_after
    assert window < wait <= longest_wait(window)
    for k in range(10):
        assert not decide(state, now + wait * k / 10, max_calls, window).allowed
    assert not decide(state, now + wait - 1e-3, max_calls, window).allowed
    again = decide(state, now + wait, max_calls, window, max_calls)
    assert again.allowed and again.remaining == 0


def test_ten_milliseconds_early_is_refused_with_an_injected_clock() -> None:
    """(5) W = 60 s, max 5: the clock is a datetime (as the engine's), moved by timedelta."""
    clock = datetime(2024, 5, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    state, refused = burst(5, 60.0, clock.timestamp())
    assert refused.retry_after == 60.75  # sub-window 1 s: the burst's drops out at :01:01
    early = clock + timedelta(seconds=refused.retry_after) - timedelta(milliseconds=10)
    on_time = clock + timedelta(seconds=refused.retry_after)
    assert not decide(state, early.timestamp(), 5, 60.0).allowed
    assert decide(state, on_time.timestamp(), 5, 60.0).allowed


@settings(max_examples=200, deadline=None)
@given(
    max_calls=max_calls_st,
    window=windows,
    plan=plans,
    cost=st.integers(min_value=1, max_value=50),
)
def test_quiet_for_61_subwindows_admits_any_allowed_cost(
    max_calls: int, window: float, plan: list[tuple[float, int]], cost: int
) -> None:
    """(6) liveness: nothing admitted for W * 61/60 → any cost <= max_calls is admitted."""
    window_us = round(window * US)
    state, now_us, last_us = LimiterState(), STARTS_US[2], STARTS_US[2]
    for fraction, wanted in plan:
        now_us += round(fraction * window_us)
        decision = decide(state, at(now_us), max_calls, window, min(wanted, max_calls))
        if decision.allowed:
            state, last_us = decision.state, now_us
    quiet_us = -((-SPAN * window_us) // SUBWINDOWS)  # ceil(W * 61/60) in µs
    decision = decide(state, at(last_us + quiet_us), max_calls, window, min(cost, max_calls))
    assert decision.allowed
    assert decision.remaining == max_calls - min(cost, max_calls)


def test_a_day_of_100000_calls_keeps_the_state_bounded() -> None:
    """(7) PER_DAY, max 100,000: 61 counts at most, a small JSON form, exact round trip."""
    day, state, now_us = 86_400.0, LimiterState(), STARTS_US[1]
    step_us = 864_000  # 100,000 calls spread evenly over the day
    for _ in range(100_000):
        now_us += step_us
        decision = decide(state, at(now_us), 100_000, day)
        assert decision.allowed
        state = decision.state
        assert len(state.counts) <= SPAN
    assert decision.remaining == 100_000 - sum(state.counts) >= 0
    assert len(json.dumps(state.to_json())) < 61 * 8 + 40
    assert roundtrip(state) == state
    assert LimiterState.from_json(None) == LimiterState.from_json({}) == LimiterState()


def test_a_full_day_limit_refuses_and_names_the_wait() -> None:
    day = 86_400.0
    state, refused = burst(100, day, at(STARTS_US[2]))
    assert len(state.counts) == 1 and not refused.allowed
    assert day < refused.retry_after <= longest_wait(day) == day * SPAN / SUBWINDOWS


def test_a_clock_a_little_behind_uncounts_nothing() -> None:
    """Another process's clock may lag by up to CLOCK_SKEW (or one sub-window): its
    calls still see every count stored."""
    state, _ = burst(3, 60.0, 1_000.0)
    assert not decide(state, 1_000.0 - CLOCK_SKEW, 3, 60.0).allowed
    state, _ = burst(3, 1.0, 1_000.0)
    assert not decide(state, 1_000.0 - CLOCK_SKEW * 0.95, 3, 1.0).allowed
    state, _ = burst(3, 86_400.0, 1_000.0)
    assert not decide(state, 1_000.0 - 86_400.0 / SUBWINDOWS, 3, 86_400.0).allowed


@settings(max_examples=300, deadline=None)
@given(
    max_calls=max_calls_st,
    window=windows,
    back_us=st.integers(min_value=1, max_value=2 * 86_400 * US),
    start=st.sampled_from(STARTS_US),
)
def test_after_a_clock_steps_back_the_waits_stay_within_the_window(
    max_calls: int, window: float, back_us: int, start: int
) -> None:
    """A burst, then the clock steps back: beyond the skew the old counts no longer
    count and every wait is at most W * 61/60, exact; within it, longer by at most the
    skew (rounded up to a sub-window)."""
    state, _ = burst(max_calls, window, at(start))
    now = at(start - back_us)
    decision = decide(state, now, max_calls, window)
    peek = decide(state, now, max_calls, window, consume=False)
    subwindow = window / SUBWINDOWS
    tolerance = max(CLOCK_SKEW, subwindow) + subwindow
    assert decision.retry_after <= longest_wait(window) + tolerance
    assert peek.reset_after <= longest_wait(window) + tolerance
    if back_us / US > tolerance:
        assert decision.allowed  # the counts of the future are from before the step
        while (refused := decide(state, now, max_calls, window)).allowed:
            state = refused.state
        assert window < refused.retry_after <= longest_wait(window)
        assert decide(state, now, max_calls, window, consume=False).reset_after <= (
            longest_wait(window)
        )
        assert decide(state, now + refused.retry_after, max_calls, window).allowed
    elif not decision.allowed:
        assert decide(state, now + decision.retry_after, max_calls, window).allowed


def test_times_before_the_epoch_use_their_own_subwindow() -> None:
    first = decide(LimiterState(), -100.0, 1, 1.0)
    assert first.allowed
    assert decide(first.state, -100.0 + 61 / 60, 1, 1.0).allowed


@pytest.mark.parametrize(
    ("max_calls", "window", "cost", "now"),
    [
        (5, 60.0, 6, 0.0),  # could never be admitted
        (5, 60.0, 0, 0.0),
        (5, 60.0, -1, 0.0),
        (0, 60.0, 1, 0.0),
        (5, 0.0, 1, 0.0),
        (5, -1.0, 1, 0.0),
        (5, math.nan, 1, 0.0),
        (5, math.inf, 1, 0.0),
        (5, 60.0, 1, math.nan),
        (5, 60.0, 1, math.inf),
    ],
)
def test_bad_input_is_a_value_error(max_calls: int, window: float, cost: int, now: float) -> None:
    with pytest.raises(ValueError):
        decide(LimiterState(), now, max_calls, window, cost)
