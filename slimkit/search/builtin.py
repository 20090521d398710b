"""The techniques slimkit ships with, offered to the optimizer: prune, fine-tune, post-training quantization.

Each ``suggest`` asks the trial for its own knobs and returns a config. Ranges are what is worth
trying on a trained model (pruning more than ~90 % of MACs in one shot rarely recovers; int4 needs
groups). Per-layer sensitivity, when the optimizer measured it, lets quantization keep the
``k`` most sensitive layers in float (``k`` is a knob), so the first trials are informed guesses.
"""

from __future__ import annotations

import re
from typing import Any

import torch.nn as nn

from slimkit.prune.channels import Channels
from slimkit.prune.magnitude import Magnitude
from slimkit.quantize.configs import Int8, WeightOnly
from slimkit.search.space import SearchContext, register_technique
from slimkit.train.recover import Finetune

#: Most layers accuracy control-style exclusion will keep in float.
MAX_SKIPPED = 3
#: Fine-tuning lengths offered (``ctx.extra["finetune_steps"]`` overrides); informed guesses take the third.
FINETUNE_STEPS = (100, 200, 400, 800)


def most_sensitive(ctx: SearchContext, k: int, kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> tuple[str, ...]:
    """The ``k`` layers whose compression alone costs the most metric (from the baseline's sensitivity)."""
    if k <= 0 or not ctx.sensitivity:
        return ()
    model = ctx.task.model
    names = [n for n, _ in sorted(ctx.sensitivity.items(), key=lambda kv: -kv[1])
             if _is(model, n, kinds)]
    return tuple(names[:k])


def _is(model: nn.Module, name: str, kinds: tuple[type, ...]) -> bool:
    try:
        return isinstance(model.get_submodule(name), kinds)
    except AttributeError:
        return False


def _skip_knob(trial: Any, ctx: SearchContext, prefix: str) -> str | tuple[str, ...]:
    """``exclude`` for a quantizer: the k most sensitive layers as a regex (also matching the parts
    a factorization split them into, ``fc1.0``/``fc1.1``), or nothing."""
    if not ctx.sensitivity:
        return ()
    k = trial.suggest_int(f"{prefix}.skip_sensitive", 0, min(MAX_SKIPPED, len(ctx.sensitivity)))
    names = most_sensitive(ctx, k)
    return "|".join(rf"{re.escape(n)}(\..+)?" for n in names) if names else ()


def has_embeddings(ctx: SearchContext) -> bool:
    """Whether the model has embedding tables (in a small transformer, half of the bytes) that 4-bit
    groups of 32 fit."""
    tables = [m for m in ctx.task.model.modules() if isinstance(m, nn.Embedding)]
    return bool(tables) and all(m.embedding_dim % 32 == 0 for m in tables)


def _embedding_bits(trial: Any, ctx: SearchContext, prefix: str) -> int:
    """8 or 4 bits for the embedding tables; asked only when the model has one."""
    return int(trial.suggest_categorical(f"{prefix}.embedding_bits", [8, 4])) if has_embeddings(ctx) else 8


def suggest_channels(trial: Any, ctx: SearchContext) -> Channels:
    """By MACs (latency) or by width (bytes: a pruned layer loses params in both dimensions, while
    a MACs target may cut early convs whose params are few). Reconstruction whenever the task has
    calibration inputs: it turns a broken pruned model into a usable one before any fine-tuning."""
    importances = ["l2", "taylor"] if ctx.trainable else ["l2", "l1"]
    reconstruct = bool(getattr(ctx.task, "calib", None))
    if trial.suggest_categorical("channels.by", ["macs", "width"]) == "width":
        amount = round(trial.suggest_float("channels.amount", 0.1, 0.8, step=0.05), 2)
        return Channels(amount=amount, importance=trial.suggest_categorical("channels.importance", importances),
                        reconstruct=reconstruct)
    return Channels(macs_ratio=round(trial.suggest_float("channels.macs_ratio", 0.15, 0.9, step=0.05), 2),
                    importance=trial.suggest_categorical("channels.importance", importances), reconstruct=reconstruct)


def suggest_magnitude(trial: Any, ctx: SearchContext) -> Magnitude:
    return Magnitude(amount=round(trial.suggest_float("magnitude.amount", 0.3, 0.95, step=0.05), 2))


def suggest_finetune(trial: Any, ctx: SearchContext) -> Finetune:
    lr = float(ctx.extra.get("finetune_lr", 1e-3))
    steps = ctx.extra.get("finetune_steps", FINETUNE_STEPS)
    return Finetune(steps=int(trial.suggest_categorical("finetune.steps", list(steps))), lr=lr)


def suggest_int8(trial: Any, ctx: SearchContext) -> Int8:
    activations = trial.suggest_categorical("int8.activations", ["dynamic", "static"])
    calibration = "minmax"
    if activations == "static":
        calibration = trial.suggest_categorical("int8.calibration", ["minmax", "percentile", "entropy", "mse"])
    return Int8(activations=activations, calibration=calibration, exclude=_skip_knob(trial, ctx, "int8"),
                embedding_bits=_embedding_bits(trial, ctx, "int8"))


def suggest_weight_only(trial: Any, ctx: SearchContext) -> WeightOnly:
    """int8 or grouped int4 weights; int4 rounds with GPTQ or to nearest when the task has
    calibration inputs (GPTQ costs a calibration pass, and buys accuracy at the same bytes)."""
    bits = trial.suggest_categorical("weight_only.bits", [8, 4])
    group = trial.suggest_categorical("weight_only.group_size", [32, 64, 128]) if bits == 4 else 0
    method = "rtn"
    if bits == 4 and getattr(ctx.task, "calib", None):
        method = trial.suggest_categorical("weight_only.method", ["gptq", "rtn"])
    return WeightOnly(bits=bits, group_size=group, targets="all", exclude=_skip_knob(trial, ctx, "weight_only"),
                      embedding_bits=_embedding_bits(trial, ctx, "weight_only"), method=method)


register_technique("channels", "prune", suggest_channels)
register_technique("magnitude", "prune", suggest_magnitude)
register_technique("finetune", "recover", suggest_finetune, applies=lambda ctx: ctx.trainable)
register_technique("int8", "quantize", suggest_int8)
register_technique("weight_only", "quantize", suggest_weight_only)
