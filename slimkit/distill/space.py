"""Distillation as the optimizer's recovery step: a step budget, the temperature and the KD weight."""

from __future__ import annotations

from typing import Any

from slimkit.distill.distiller import Distill
from slimkit.search.space import SearchContext, register_technique

#: Step budgets the optimizer chooses between; short, since every trial pays for them.
STEPS = (100, 200, 400)


def suggest_distill(trial: Any, ctx: SearchContext) -> Distill:
    steps = trial.suggest_categorical("distill.steps", list(STEPS))
    temperature = trial.suggest_float("distill.temperature", 1.0, 8.0, log=True)
    alpha = trial.suggest_float("distill.alpha", 0.3, 1.0)
    big = sum(p.numel() for p in ctx.task.model.parameters()) > 5_000_000
    lr = 3e-5 if big else 1e-3  # large pre-trained models (transformers) want a small rate
    return Distill(steps=int(steps), temperature=temperature, alpha=alpha, lr=lr)


register_technique("distill", "recover", suggest_distill, lambda ctx: bool(ctx.trainable))
