"""Speed ratios from contenders timed in the same rounds; noise detected from the spread and said.

Timings here are fake and exact: each contender advances an injected clock by a scripted number of
milliseconds, so the rules are tested without real time."""

from __future__ import annotations

import itertools

import pytest

from slimkit.core.errors import SlimkitError
from slimkit.measure.speed_ratio import NOISY, compare_speed


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def contender(self, ms: list[float]):
        """A call that takes the next of ``ms`` (cycled) milliseconds on this clock."""
        durations = itertools.cycle(ms)

        def call() -> None:
            self.now += next(durations) / 1e3
        return call


@pytest.mark.parametrize("original,candidate,ratio,noisy", [
    ([10.0], [2.5], 4.0, False),                                   # steady: a point figure
    ([10.0, 10.5, 9.5], [5.0, 5.25, 4.75], 2.0, False),            # both move together: the ratio holds
    ([10.0, 10.0, 10.0, 40.0], [2.0, 2.0, 2.0, 2.0], 5.0, True),   # a busy round in four: noisy, a range
])
def test_ratio_is_the_median_of_per_round_ratios(original, candidate, ratio, noisy):
    clock = FakeClock()
    comparison = compare_speed({"original": clock.contender(original), "candidate": clock.contender(candidate)},
                               rounds=8, min_time_s=0.0, max_seconds=1.0, clock=clock, load=lambda: 0.5)
    r = comparison.ratio("original", "candidate")
    assert r.ratio == pytest.approx(ratio, rel=0.03) and r.noisy is noisy and r.load == 0.5
    assert r.low <= r.ratio <= r.high
    if noisy:
        assert NOISY in r.text() and f"{r.low:.2f}-{r.high:.2f}x" in r.text()
    else:
        assert r.text() == f"{r.ratio:.2f}x"


def test_noisy_rounds_are_repeated_up_to_the_time_cap():
    clock = FakeClock()
    # every fourth call of the original is 4x slower: noisy whatever the number of rounds
    comparison = compare_speed({"original": clock.contender([10.0, 10.0, 10.0, 40.0]),
                                "candidate": clock.contender([2.0])},
                               rounds=4, min_time_s=0.0, max_seconds=0.5, clock=clock)
    rounds = comparison.timings["original"].rounds
    assert rounds > 4 and rounds % 4 == 0  # repeated in whole batches of rounds
    assert clock.now >= 0.5  # ... until the cap
    steady = FakeClock()
    once = compare_speed({"a": steady.contender([3.0]), "b": steady.contender([1.0])}, rounds=4, min_time_s=0.0,
                         max_seconds=0.5, clock=steady)
    assert once.timings["a"].rounds == 4 and not once.timings["a"].noisy  # steady: no extra rounds


@pytest.mark.parametrize("kwargs", [{"rounds": 2}, {"min_time_s": -1.0}, {"max_seconds": 0.0}])
def test_bad_settings_are_one_line_errors(kwargs):
    clock = FakeClock()
    with pytest.raises(SlimkitError):
        compare_speed({"a": clock.contender([1.0]), "b": clock.contender([1.0])}, clock=clock, **kwargs)
    with pytest.raises(SlimkitError, match="two contenders"):
        compare_speed({"a": clock.contender([1.0])}, clock=clock)


def test_by_default_extra_rounds_take_at_most_twice_the_first_rounds():
    clock = FakeClock()
    comparison = compare_speed({"original": clock.contender([10.0, 10.0, 10.0, 40.0]),
                                "candidate": clock.contender([2.0])}, rounds=4, min_time_s=0.0, clock=clock)
    first = (2 * 10.0 + 2 * 2.0 + 10.0 + 40.0 + 10.0 + 10.0 + 4 * 2.0) / 1e3  # warm-up + four rounds: 0.102 s
    assert comparison.timings["original"].rounds > 4
    # the first rounds, twice that again, and the batch of rounds that crossed it: far below the 5 s cap
    assert 3 * first <= clock.now <= 3 * first + 0.1
