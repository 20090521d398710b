import math

import pytest

from slimkit import Measurement, SlimkitError, Target


def test_constraint_vector_is_the_overshoot_per_limit():
    t = Target(max_size_mb=5, max_latency_ms=3, max_drop=0.01)
    assert t.names() == ["size_mb", "latency_ms", "drop"]
    m = Measurement(size_mb=4.0, latency_ms=3.5, drop=0.002)
    assert t.constraints(m) == pytest.approx([-1.0, 0.5, -0.008])
    assert not t.feasible(m)
    assert t.feasible(Measurement(size_mb=5.0, latency_ms=2.0, drop=0.0))


def test_unmeasured_quantity_is_never_assumed_to_fit():
    t = Target(max_size_mb=1, max_latency_ms=1)
    assert t.constraints(Measurement(size_mb=0.5)) == [-0.5, math.inf]


@pytest.mark.parametrize("kwargs,word", [
    ({"max_size_mb": -1}, "max_size_mb=-1 is impossible"),
    ({"max_latency_ms": 0}, "max_latency_ms=0 is impossible"),
    ({"max_drop": float("nan")}, "max_drop=nan is impossible"),
    ({"threads": 0}, "threads=0 is invalid"),
    ({"device": "tpu"}, "device 'tpu' is not supported"),
])
def test_impossible_targets_are_refused(kwargs, word):
    with pytest.raises(SlimkitError, match=word.replace("(", r"\(")):
        Target(**kwargs)


def test_zero_drop_is_allowed():
    assert Target(max_drop=0).constraints(Measurement(drop=0.0)) == [0.0]


@pytest.mark.parametrize("kwargs,original_ms,limit", [
    ({"max_latency_vs_original": 1.0}, 4.0, 4.0),                        # no slower than the original
    ({"max_latency_vs_original": 0.5}, 4.0, 2.0),                        # twice as fast
    ({"max_latency_vs_original": 0.5, "max_latency_ms": 1.5}, 4.0, 1.5),  # the tighter of the two
    ({"max_latency_ms": 3.0}, 4.0, 3.0),                                 # no relative limit: unchanged
    ({"max_latency_vs_original": 1.0}, 0.0, None),                       # the original was not timed
])
def test_a_relative_latency_limit_becomes_milliseconds_from_a_timing_of_the_original(kwargs, original_ms, limit):
    t = Target(**kwargs).with_original_latency(original_ms)
    assert t.max_latency_ms == limit
    assert ("latency_ms" in t.names()) == (limit is not None)


def test_a_relative_latency_limit_must_be_positive():
    with pytest.raises(SlimkitError, match="max_latency_vs_original=-1 is impossible"):
        Target(max_latency_vs_original=-1)
