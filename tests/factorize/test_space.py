"""The optimizer sees svd/tucker/cp in stage "factorize" and gets valid configs from fixed trials."""

import optuna
import pytest
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.core.registry import SearchContext
from slimkit.core.registry import searchable as techniques
from slimkit.factorize import CP, SVD, Tucker


def context(task):
    return SearchContext(task=task, target=None, baseline={}, trainable=True)


def test_factorize_techniques_are_listed_in_their_stage():
    found = {t.search: t.stage for t in techniques(["svd", "tucker", "cp"])}
    assert found == {"svd": "factorize", "tucker": "factorize", "cp": "factorize"}


def test_fixed_trials_give_valid_configs(digits_task):
    ctx = context(digits_task)
    svd, tucker, cp = techniques(["svd", "tucker", "cp"])
    c = svd.suggest(optuna.trial.FixedTrial({"svd.rank_ratio": 0.25, "svd.allocation": "uniform"}), ctx)
    assert c == SVD(rank_ratio=0.25)
    assert tucker.suggest(optuna.trial.FixedTrial({"tucker.ratio": 0.4}), ctx) == Tucker(ratio=0.4)
    assert cp.suggest(optuna.trial.FixedTrial({"cp.ratio": 0.2}), ctx) == CP(ratio=0.2)
    model = sk.apply(digits_task.model, c)
    assert last_record(model).params[1] < last_record(model).params[0]
    for t in (svd, tucker, cp):
        assert t.applies(ctx)


def test_tucker_and_cp_do_not_apply_without_spatial_convs(digits_task):
    import dataclasses

    mlp = dataclasses.replace(digits_task, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    ctx = context(mlp)
    svd, tucker, cp = techniques(["svd", "tucker", "cp"])
    assert svd.applies(ctx) and not tucker.applies(ctx) and not cp.applies(ctx)


def test_out_of_range_trial_value_is_refused(digits_task):
    (tucker,) = techniques(["tucker"])
    with pytest.raises(sk.SlimkitError):
        tucker.suggest(optuna.trial.FixedTrial({"tucker.ratio": 0.0}), context(digits_task))
