"""How a search sizes its parts to the model and the budget: numbers in, numbers out (no clocks read)."""

from __future__ import annotations

import time

import pytest
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.prune.reconstruct import RIDGES
from slimkit.search.budget import (MAX_SENSITIVITY_LAYERS, MIN_STEPS, TRAINING_SECONDS, TimeBudget, enough_for_another, finetune_steps,
                                   finish_reserve, reconstruction_flops, sensitivity_layers, sized_extra)
from slimkit.search.budget import REPORT_SECONDS, process_start


@pytest.mark.parametrize("step_s,budget_s,trials,expected", [
    (0.001, None, 30, (100, 200, 400, 800)),   # a tiny model: every length fits in a trial
    (0.08, None, 30, (100, 200)),              # 25 s of training per step of a trial at most
    (0.2, None, 30, (100,)),
    (2.0, None, 30, (12,)),                    # nothing offered fits: the most that does
    (50.0, None, 30, (10,)),                   # never fewer than the fewest worth taking
    (0.08, 300.0, 30, (100, 200)),             # a quarter-of-a-half of 300 s is 37.5 s: 25 s still bounds
    (0.08, 60.0, 30, (93,)),                   # 7.5 s: no offered length fits, 93 steps do
    (0.01, 60.0, 1, (100, 200, 400, 800)),     # one trial may take 30 s
])
def test_recovery_lengths_fit_a_trial(step_s, budget_s, trials, expected):
    steps = finetune_steps(step_s, TimeBudget(budget_s), trials)
    assert steps == expected
    assert all(s * step_s <= TRAINING_SECONDS or s == MIN_STEPS for s in steps)


@pytest.mark.parametrize("metric_s,budget_s,expected", [
    (0.01, None, MAX_SENSITIVITY_LAYERS),      # fast metric: the largest layers, all probed
    (5.0, None, 6),                            # 30 s / 5 s
    (40.0, None, 0),                           # one run does not fit: no sensitivity
    (1.0, 50.5, 5),                            # a tenth of the budget
])
def test_sensitivity_probes_what_fits(metric_s, budget_s, expected):
    assert sensitivity_layers(metric_s, TimeBudget(budget_s)) == expected


@pytest.mark.parametrize("seconds,left,reserve,expected", [
    ([], None, 0.0, True),                      # unbounded
    ([], 10.0, 5.0, True),                      # nothing known yet: try one
    ([], 4.0, 5.0, False),                      # the end's reserve is all that is left
    ([30.0, 50.0, 40.0], 81.0, 30.0, True),     # 51 s left after the reserve: a trial as slow as the slowest fits
    ([30.0, 50.0, 40.0], 80.0, 30.0, False),    # 50 s: it would end just as the end's work must start
    ([30.0, 50.0, 40.0], 120.0, 30.0, True),    # the best is saved by its trial: no rebuild to keep time for
])
def test_a_trial_starts_only_when_one_as_slow_as_the_slowest_still_fits(seconds, left, reserve, expected):
    assert enough_for_another(seconds, left, reserve) is expected


def test_budget_arithmetic_and_refusals():
    assert finish_reserve(2.0) == 6.0 + REPORT_SECONDS and finish_reserve(2.0, report=False) == 6.0
    assert process_start() <= time.monotonic()  # this process began before now, never in the future
    assert TimeBudget(None).left() is None and TimeBudget(None).share(0.1, 30.0) == 30.0
    assert 0 < TimeBudget(100.0).left() <= 100.0
    for bad in (0, -1.0):
        with pytest.raises(SlimkitError, match="time_budget"):
            TimeBudget(bad)


@pytest.mark.parametrize("layer,d,out", [
    (nn.Linear(100, 10), 101, 10),
    (nn.Conv2d(64, 128, 3), 64 * 9 + 1, 128),
    (nn.Conv2d(64, 64, 3, groups=64), 9 + 1, 64),         # depthwise: one input channel per output
    (nn.Conv1d(16, 32, 5), 16 * 5 + 1, 32),
])
def test_reconstruction_cost_grows_with_the_cube_of_each_layers_inputs(layer, d, out):
    expected = 2 * len(RIDGES) * (d ** 3 / 3 + 3 * d * d * out) + 2 * (2 * d ** 3 / 3 + 2 * d * d * out)
    assert reconstruction_flops(nn.Sequential(layer)) == pytest.approx(expected)


def test_a_tiny_model_is_offered_reconstruction_and_the_shortest_lengths_first():
    from slimkit.core.registry import searchable
    from tests.models import mlp, tiny_task

    extra = sized_extra(tiny_task(mlp), searchable(["channels", "finetune", "distill"]), {}, TimeBudget(None), 30)
    assert extra["reconstruct"] is True  # a few hundred thousand flops
    for key, offered in (("finetune_steps", [100, 200, 400, 800]), ("distill_steps", [100, 200, 400])):
        steps = extra[key]  # how many fit depends on this machine's speed: a prefix of what is offered, or fewer
        assert steps == offered[:len(steps)] or (len(steps) == 1 and MIN_STEPS <= steps[0] < offered[0])
    mine = sized_extra(tiny_task(mlp), searchable(["channels", "finetune"]), {"reconstruct": False,
                                                                              "finetune_steps": [7]}, TimeBudget(None), 30)
    assert mine["reconstruct"] is False and mine["finetune_steps"] == [7]  # the caller's choice stands


def test_cp_is_not_offered_where_its_sweeps_would_not_fit_a_trial():
    from slimkit.core.registry import SearchContext, searchable
    from slimkit.core.target import Target
    from slimkit.search.budget import CP_SWEEPS, cp_flops
    from slimkit.search.optimize import suggest_pipeline
    from tests.models import cnn, tiny_task

    conv = nn.Sequential(nn.Conv2d(512, 512, 3), nn.Conv2d(512, 64, 1))  # the 1x1 conv is not CP's
    rank = int(0.35 * 512 * 512 * 9 / (512 + 512 + 3 + 3))
    assert cp_flops(conv) == CP_SWEEPS * 10 * 512 * 512 * 9 * rank
    big = tiny_task(cnn)
    big.model = nn.Sequential(*[nn.Conv2d(512, 512, 3, padding=1) for _ in range(8)])  # ~1e14 flops of ALS
    extra = sized_extra(big, searchable(["cp", "svd"]), {}, TimeBudget(None), 30)
    assert "cp" in extra["too_slow"] and "would take about" in extra["too_slow"]["cp"]
    ctx = SearchContext(task=big, target=Target(max_drop=0.1), baseline={}, sensitivity={}, trainable=False,
                        extra=extra)

    class Always:  # a trial that takes whatever is offered: never CP here
        params: dict = {}

        def suggest_categorical(self, name, choices):
            assert "cp" not in choices
            return choices[-1]

        def suggest_float(self, name, low, high, **kw):
            return low

    configs = suggest_pipeline(Always(), ctx, searchable(["cp", "svd"]))
    assert [c.type_name for c in configs] == ["factorize.SVD"]
