"""Offer fusion to the optimizer: the last stage of a pipeline folds BatchNorms and picks a compiler."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from slimkit.architecture.compile import inductor_available
from slimkit.architecture.fuse import Fuse, find_pairs
from slimkit.search.space import SearchContext, register_technique


def suggest(trial: Any, ctx: SearchContext) -> Fuse:
    """One knob: the compiler (``fuse.compile``); inductor is offered only where it can build."""
    choices = ["none", "onnxruntime"] + (["inductor"] if inductor_available()[0] else [])
    choice = trial.suggest_categorical("fuse.compile", choices)
    return Fuse(compile=None if choice == "none" else choice)


def applies(ctx: SearchContext) -> bool:
    """Only models with a BatchNorm that follows a conv/linear have anything to fold."""
    model: nn.Module = ctx.task.model
    if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules()):
        return False
    try:
        return bool(find_pairs(model.eval(), tuple(ctx.task.example)))
    except Exception:  # a model that cannot even run its example is not ours to judge here
        return False


register_technique("fuse", "fuse", suggest, applies)
