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
