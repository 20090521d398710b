"""Factorization's knobs for the optimizer: one kept-parameter ratio per method, stage "factorize"."""

from __future__ import annotations

from typing import Any

from slimkit.factorize.cp import CP
from slimkit.factorize.svd import SVD
from slimkit.factorize.tucker import Tucker
from slimkit.search.space import SearchContext, register_technique


def _has(ctx: SearchContext, spatial: bool) -> bool:
    """Whether the task's model has layers the method decomposes (kxk convs for Tucker/CP)."""
    import torch.nn as nn

    from slimkit.factorize.layers import is_spatial

    layers = [m for m in ctx.task.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return any(is_spatial(m) for m in layers) if spatial else bool(layers)


def suggest_svd(trial: Any, ctx: SearchContext) -> SVD:
    return SVD(rank_ratio=trial.suggest_float("svd.rank_ratio", 0.1, 0.7),
               allocation=trial.suggest_categorical("svd.allocation", ["uniform", "sensitivity"]))


def suggest_tucker(trial: Any, ctx: SearchContext) -> Tucker:
    return Tucker(ratio=trial.suggest_float("tucker.ratio", 0.1, 0.6))


def suggest_cp(trial: Any, ctx: SearchContext) -> CP:
    return CP(ratio=trial.suggest_float("cp.ratio", 0.1, 0.6))


register_technique("svd", "factorize", suggest_svd, lambda ctx: _has(ctx, spatial=False))
register_technique("tucker", "factorize", suggest_tucker, lambda ctx: _has(ctx, spatial=True))
register_technique("cp", "factorize", suggest_cp, lambda ctx: _has(ctx, spatial=True))
