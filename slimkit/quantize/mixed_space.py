"""QAT, mixed precision and ternary weights, offered to the optimizer (``slimkit.search.space``).

All three run in the "quantize" stage. QAT and ternary train, so they apply only when the task can
be fine-tuned (``ctx.trainable``). Mixed precision's knobs are the byte budget, int8 x int8 or
weight-only 8-bit layers, and whether int4 layers may also take group 128; when the optimizer has
measured per-layer sensitivity for every weight layer, the integer program uses it instead of
measuring again (its 4-bit drops at group 32; 8 bits is taken as 1/256 of that; group 128 is measured).
"""

from __future__ import annotations

from typing import Any

from slimkit.measure.sensitivity import weight_layers
from slimkit.quantize.extreme import Ternary
from slimkit.quantize.mixed import Mixed
from slimkit.quantize.qat import QAT
from slimkit.search.space import SearchContext, register_technique


def suggest_qat(trial: Any, ctx: SearchContext) -> QAT:
    bits = trial.suggest_categorical("qat.bits", [8, 4])
    steps = trial.suggest_categorical("qat.steps", list(ctx.extra.get("qat_steps", (100, 300))))
    learn = trial.suggest_categorical("qat.learn_scale", [True, False])
    if bits == 4:
        group = trial.suggest_categorical("qat.group_size", [32, 64, 128])
        return QAT(bits=4, weight_only=True, group_size=group, steps=int(steps), learn_scale=learn)
    return QAT(bits=8, steps=int(steps), learn_scale=learn)


def suggest_mixed(trial: Any, ctx: SearchContext) -> Mixed:
    """Per-layer widths under a byte budget, or every layer at its narrowest width (the smallest artifact)."""
    if trial.suggest_categorical("mixed.widths", ["budget", "narrowest"]) == "narrowest":
        return Mixed(narrowest=True)
    ratio = round(trial.suggest_float("mixed.budget_ratio", 0.2, 0.5, step=0.01), 2)
    names = weight_layers(ctx.task.model)
    known = dict(ctx.sensitivity) if ctx.sensitivity and all(n in ctx.sensitivity for n in names) else None
    activations = trial.suggest_categorical("mixed.activations", ["none", "dynamic"])  # int8 x int8 8-bit layers
    # int4 at group 128 as well as 32: 4.5 instead of 6 bits a weight, bytes the solver can spend on 8-bit layers
    groups = trial.suggest_categorical("mixed.int4_groups", ["32", "32+128"])
    return Mixed(budget_ratio=ratio, sensitivity=known, activations=activations,
                 int4_groups=(128,) if groups == "32+128" else ())


def suggest_ternary(trial: Any, ctx: SearchContext) -> Ternary:
    steps = trial.suggest_categorical("ternary.steps", list(ctx.extra.get("ternary_steps", (300, 600))))
    return Ternary(steps=int(steps))


register_technique("qat", "quantize", suggest_qat, applies=lambda ctx: ctx.trainable)
register_technique("mixed", "quantize", suggest_mixed)
register_technique("ternary", "quantize", suggest_ternary, applies=lambda ctx: ctx.trainable)
