"""A latency limit is judged on the candidate timed together with the original (exact, injected timings)."""

from __future__ import annotations

import pytest

import slimkit as sk
from slimkit.measure.speed_ratio import SpeedComparison, Timing
from slimkit.search.evaluate import RuntimeMeasurer
from slimkit.search.latency_check import check_latency, latency_constraint, latency_limit


def fake_compare(original_ms: float, candidate_ms: float, noisy: bool = False):
    """A ``compare_speed`` stand-in: runs each contender once, returns the given p50s."""
    cv = 0.5 if noisy else 0.01

    def compare(contenders):
        for run in contenders.values():
            run()
        timings = {"original": Timing(original_ms, original_ms, cv, 7), "candidate": Timing(candidate_ms, candidate_ms, cv, 7)}
        return SpeedComparison(timings, {"original": [original_ms] * 7, "candidate": [candidate_ms] * 7}, 0.0)

    return compare


@pytest.mark.parametrize("asked,original_ms,candidate_ms,limit_ms,met,noisy", [
    (sk.Target(max_latency_vs_original=1.0), 10.0, 9.0, 10.0, True, False),      # no slower than the original
    (sk.Target(max_latency_vs_original=1.0), 10.0, 11.0, 10.0, False, False),
    (sk.Target(max_latency_vs_original=0.5), 4.0, 2.5, 2.0, False, True),        # twice as fast, on a noisy machine
    (sk.Target(max_latency_ms=5.0, max_latency_vs_original=1.0), 10.0, 6.0, 5.0, False, False),  # the tighter one
    (sk.Target(max_latency_ms=5.0), 10.0, 4.9, 5.0, True, False),
])
def test_the_verdict_comes_from_the_shared_rounds(asked, original_ms, candidate_ms, limit_ms, met, noisy):
    ran = []
    check = check_latency(lambda: ran.append("o"), lambda: ran.append("c"), asked,
                          compare=fake_compare(original_ms, candidate_ms, noisy))
    assert ran == ["o", "c"]
    assert (check.original_ms, check.candidate_ms, check.limit_ms) == (original_ms, candidate_ms, limit_ms)
    assert check.met is met and check.noisy is noisy
    assert ("not met" in check.text()) is not met and ("noisy" in check.text()) is noisy
    assert latency_limit(asked, original_ms) == limit_ms


def test_the_constraint_vector_takes_the_latency_entry_from_the_check():
    target = sk.Target(max_size_mb=1.0, max_latency_ms=3.0, max_drop=0.01)  # names: size_mb, latency_ms, drop
    check = {"candidate_ms": 2.5, "limit_ms": 2.0}
    assert latency_constraint(target, [-0.5, -1.0, -0.002], check) == [-0.5, 0.5, -0.002]
    assert latency_constraint(target, [-0.5, -1.0, -0.002], None) == [-0.5, -1.0, -0.002]
    assert latency_constraint(sk.Target(max_drop=0.01), [-0.002], check) == [-0.002]


@pytest.mark.parametrize("candidate_ms,met", [(0.5, True), (2.0, False)])
def test_a_search_trial_that_fits_is_re_timed_beside_the_original(digits_task, candidate_ms, met):
    """Its own timing passed (a generous limit in ms); the shared rounds decide (original at 1 ms)."""
    measure = RuntimeMeasurer(digits_task, sk.Target(max_latency_ms=1e6, max_drop=0.5, threads=1), backend="torch")
    baseline, _ = measure([], early_stop=False)
    measure.baseline_score, measure.asked = baseline.score, sk.Target(max_latency_vs_original=1.0, threads=1)
    measure.compare_speed = fake_compare(1.0, candidate_ms)
    assert baseline.latency_check is None  # the original itself is never re-timed

    m, model = measure([sk.quantize.Float16()])
    assert model is not None and m.latency_check is not None
    assert m.latency_check["met"] is met and m.latency_check["limit_ms"] == 1.0
    assert m.latency_check["candidate_ms"] == candidate_ms and "re-timing with the original" in m.timings
    constraints = latency_constraint(measure.target, [-1.0, -0.1], m.latency_check)  # latency, drop
    assert (constraints[0] <= 0) is met and constraints[0] == pytest.approx(candidate_ms - 1.0)


def test_a_trial_line_says_when_the_shared_rounds_failed_it():
    from types import SimpleNamespace

    from slimkit.search.trial_progress import trial_line

    check = {"candidate_ms": 2.0, "limit_ms": 1.0, "met": False}
    frozen = SimpleNamespace(number=3, user_attrs={"recipe": [{"type": "quantize.Float16"}], "constraints": [1.0],
                                                   "measured": {"size_mb": 0.01, "latency_ms": 0.4, "latency_check": check}})
    assert "2 ms beside the original, over its 1 ms limit" in trial_line(frozen) and "misses" in trial_line(frozen)
