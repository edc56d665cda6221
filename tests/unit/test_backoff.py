"""The retry delays of :class:`relay.net.backoff.Backoff`: bounds, growth, cap and reset."""

from __future__ import annotations

from typing import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.net.backoff import Backoff

INITIAL = st.floats(min_value=0.001, max_value=10.0)
FACTOR = st.floats(min_value=1.0, max_value=4.0)
CAP = st.floats(min_value=0.0, max_value=600.0)
JITTER = st.tuples(
    st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=1.0)
).map(sorted)
DRAWS = st.lists(st.floats(min_value=0.0, max_value=1.0, exclude_max=True), max_size=60)


def scripted(draws: list[float]) -> Callable[[], float]:
    """A random source that returns ``draws`` in turn, then 0.5."""
    values = iter(draws)
    return lambda: next(values, 0.5)


@given(INITIAL, FACTOR, CAP, JITTER, DRAWS)
def test_every_delay_is_within_its_jittered_bounds(
    initial: float, factor: float, cap: float, jitter: list[float], draws: list[float]
) -> None:
    low, high = jitter
    backoff = Backoff(initial, factor, cap, (low, high), scripted(draws))
    for n in range(len(draws) + 5):
        base = min(cap, initial * factor**n)
        delay = backoff.next()
        assert base * low - 1e-9 <= delay <= base * high + 1e-9
        assert delay <= cap * high + 1e-9


@given(INITIAL, FACTOR, CAP, st.integers(min_value=1, max_value=80))
def test_without_jitter_delays_grow_by_factor_until_the_cap(
    initial: float, factor: float, cap: float, count: int
) -> None:
    backoff = Backoff(initial, factor, cap)
    delays = [backoff.next() for _ in range(count)]
    assert delays[0] == min(cap, initial)
    for before, after in zip(delays, delays[1:]):
        assert after >= before
        assert after == pytest.approx(min(cap, before * factor)) or after == cap
    assert max(delays) <= cap
    assert backoff.attempts == count


@given(INITIAL, FACTOR, CAP, JITTER, st.integers(min_value=0, max_value=30))
def test_reset_starts_over(
    initial: float, factor: float, cap: float, jitter: list[float], count: int
) -> None:
    backoff = Backoff(initial, factor, cap, (jitter[0], jitter[1]), lambda: 0.25)
    first = backoff.next()
    for _ in range(count):
        backoff.next()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next() == first


def test_never_overflows_after_many_failures() -> None:
    backoff = Backoff(0.25, 2.0, 30.0, (0.5, 1.0), lambda: 0.999)
    for _ in range(5000):
        delay = backoff.next()
    assert 15.0 <= delay <= 30.0


def test_the_workers_numbers() -> None:
    """0.25 s doubling to --reconnect-max, scaled by 0.5 to 1.0 (ExitClient)."""
    backoff = Backoff(0.25, 2.0, 30.0, (0.5, 1.0), lambda: 1.0)
    assert [backoff.next() for _ in range(9)] == [0.25, 0.5, 1, 2, 4, 8, 16, 30, 30]
    backoff = Backoff(0.25, 2.0, 30.0, (0.5, 1.0), lambda: 0.0)
    assert backoff.next() == 0.125


def test_bad_parameters() -> None:
    for kwargs in ({"initial": -1.0}, {"factor": 0.5}, {"cap": -1.0}, {"jitter": (0.9, 0.1)}):
        with pytest.raises(ValueError):
            Backoff(**{"initial": 1.0, **kwargs})  # type: ignore[arg-type]
