"""Property tests of the limiter rule (pure, no database)."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxengine.ratelimit import SUBWINDOWS, LimiterState, decide

windows = st.sampled_from([0.5, 1.0, 7.3, 60.0, 86_400.0])
steps = st.lists(
    st.tuples(st.floats(min_value=0, max_value=2.0), st.integers(min_value=1, max_value=5)),
    min_size=1,
    max_size=120,
)


def replay(max_calls: int, window: float, plan: list[tuple[float, int]], start: float = 1e9):
    """Offer every (delay as a fraction of the window, cost); the admitted (time, cost)."""
    state, now, admitted = LimiterState(), start, []
    for fraction, cost in plan:
        now += fraction * window / 7
        if cost > max_calls:
            with pytest.raises(ValueError):
                decide(state, now, max_calls, window, cost)
            continue
        decision = decide(state, now, max_calls, window, cost)
        if decision.allowed:
            admitted.append((now, cost))
            state = decision.state
        else:
            assert decision.state == state  # a refusal consumes nothing
            assert decision.retry_after > 0
        assert len(state.counts) <= SUBWINDOWS + 1
    return admitted, state


@settings(max_examples=200, deadline=None)
@given(max_calls=st.integers(min_value=1, max_value=20), window=windows, plan=steps)
def test_no_window_ever_holds_more_than_the_limit(
    max_calls: int, window: float, plan: list[tuple[float, int]]
) -> None:
    admitted, _ = replay(max_calls, window, plan)
    times = [t for t, _ in admitted]
    for i, (end, _) in enumerate(admitted):
        first = bisect.bisect_right(times, end - window)  # calls in (end - W, end]
        assert sum(c for _, c in admitted[first : i + 1]) <= max_calls


@settings(max_examples=100, deadline=None)
@given(
    max_calls=st.integers(min_value=1, max_value=50),
    window=windows,
    offset=st.floats(min_value=0, max_value=1),
)
def test_retry_after_is_exact_and_bounded(max_calls: int, window: float, offset: float) -> None:
    now = round(1_700_000_000 + offset * window, 6)  # clocks tick in microseconds
    state = LimiterState()
    for _ in range(max_calls):
        decision = decide(state, now, max_calls, window)
        assert decision.allowed
        state = decision.state
    refused = decide(state, now, max_calls, window)
    assert not refused.allowed
    assert refused.retry_after <= window * 61 / 60 + 1e-6
    assert refused.retry_after >= window - window / SUBWINDOWS - 1e-6
    assert not decide(state, now + refused.retry_after - 1e-3, max_calls, window).allowed
    assert decide(state, now + refused.retry_after, max_calls, window).allowed


def test_ten_milliseconds_early_is_refused() -> None:
    state = LimiterState()
    for _ in range(5):
        state = decide(state, 1000.25, 5, 60).state
    refused = decide(state, 1000.25, 5, 60)
    assert refused.retry_after == pytest.approx(60.75)
    assert not decide(state, 1000.25 + refused.retry_after - 0.010, 5, 60).allowed
    assert decide(state, 1000.25 + refused.retry_after, 5, 60).allowed


def test_quiet_for_a_window_admits_again() -> None:
    state = LimiterState()
    for i in range(3):
        state = decide(state, 10.0 + i, 3, 60).state
    assert decide(state, 12.0 + 60 * 61 / 60, 3, 60, cost=3).allowed


def test_a_day_of_100000_calls_keeps_61_counts() -> None:
    state, now = LimiterState(), 0.0
    for _ in range(100_000):
        now += 86_400 / 100_000
        decision = decide(state, now, 100_000, 86_400)
        assert decision.allowed
        state = decision.state
    assert len(state.counts) <= SUBWINDOWS + 1
    assert LimiterState.from_json(state.to_json()) == state
    assert not decide(state, now, 100_000, 86_400).allowed


def test_peek_changes_nothing_and_json_round_trips() -> None:
    state = decide(LimiterState(), 5.0, 2, 1.0).state
    peek = decide(state, 5.0, 2, 1.0, consume=False)
    assert peek.allowed and peek.state == state and peek.remaining == 1
    assert LimiterState.from_json(None) == LimiterState.from_json({}) == LimiterState()
    assert LimiterState.from_json(state.to_json()) == state
