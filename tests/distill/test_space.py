"""Distillation is the optimizer's "recover" technique: listed, valid configs, only with training data."""

import optuna

from slimkit.core.registry import SearchContext
from slimkit.core.registry import searchable as techniques
from slimkit.distill import Distill


def test_distill_is_a_recover_technique_with_valid_configs(digits_task):
    (tech,) = techniques(["distill"])
    assert tech.stage == "recover"
    ctx = SearchContext(task=digits_task, target=None, baseline={}, trainable=True)
    trial = optuna.trial.FixedTrial({"distill.steps": 200, "distill.temperature": 2.0, "distill.alpha": 0.7})
    config = tech.suggest(trial, ctx)
    assert config == Distill(steps=200, temperature=2.0, alpha=0.7, lr=1e-3)
    assert tech.applies(ctx)
    assert not tech.applies(SearchContext(task=digits_task, target=None, baseline={}, trainable=False))
