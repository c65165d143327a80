"""Backoff: capped exponential growth with jitter, reset after a success."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_bridge.backoff import Backoff


class HighestRandom(random.Random):
    """Always draws the top of the range, so ``next()`` returns the ceiling."""

    def uniform(self, a, b):
        return b


class LowestRandom(random.Random):
    def uniform(self, a, b):
        return a


def test_ceiling_doubles_per_attempt_up_to_the_cap():
    backoff = Backoff(initial=0.5, cap=6.0, rng=HighestRandom())
    assert [backoff.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0, 6.0]
    assert backoff.attempt == 7


def test_reset_starts_over_from_the_initial_delay():
    backoff = Backoff(initial=1.0, cap=30.0, rng=HighestRandom())
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.ceiling() == 1.0
    assert backoff.next() == 1.0


def test_lowest_draw_is_never_negative_nor_above_the_ceiling():
    backoff = Backoff(initial=2.0, cap=10.0, rng=LowestRandom())
    for _ in range(10):
        ceiling = backoff.ceiling()
        assert 0 <= backoff.next() <= ceiling


def test_many_failures_do_not_overflow():
    backoff = Backoff(initial=0.5, cap=30.0, rng=HighestRandom())
    backoff.attempt = 10_000
    assert backoff.ceiling() == 30.0
    assert backoff.next() == 30.0


def test_initial_equal_to_cap_is_a_constant_ceiling():
    backoff = Backoff(initial=3.0, cap=3.0, rng=HighestRandom())
    assert [backoff.next() for _ in range(3)] == [3.0, 3.0, 3.0]


def test_defaults():
    backoff = Backoff()
    assert (backoff.initial, backoff.cap, backoff.attempt) == (0.5, 30.0, 0)


@pytest.mark.parametrize(("initial", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_invalid_parameters_are_refused(initial, cap):
    with pytest.raises(ValueError, match="0 < initial <= cap"):
        Backoff(initial=initial, cap=cap)


def test_jitter_spreads_delays():
    backoff = Backoff(initial=1.0, cap=1000.0, rng=random.Random(1))
    backoff.attempt = 8
    delays = set()
    for _ in range(20):
        delays.add(backoff.next())
        backoff.attempt = 8
    assert len(delays) == 20


@settings(max_examples=200, deadline=None)
@given(
    st.floats(min_value=0.001, max_value=10),
    st.floats(min_value=1, max_value=100),
    st.integers(min_value=0, max_value=80),
    st.integers(min_value=0, max_value=2**32),
)
def test_every_delay_lies_within_zero_and_the_capped_ceiling(initial, factor, failures, seed):
    backoff = Backoff(initial=initial, cap=initial * factor, rng=random.Random(seed))
    for attempt in range(failures + 1):
        expected_ceiling = min(initial * factor, initial * 2**attempt)
        assert backoff.ceiling() == pytest.approx(expected_ceiling)
        assert 0 <= backoff.next() <= backoff.cap
