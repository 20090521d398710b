"""``quantize.Int8``: int8 weights and activations (dynamic or calibrated static), run on integer kernels."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch.nn as nn

from slimkit.calibrate.ranges import collect, compute_range
from slimkit.core.config import BaseConfig, technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.quantize.bias_correction import bias_correction_knob
from slimkit.quantize.equalization import equalization_knob
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.options import (
    CALIBRATIONS,
    PTQConfig,
    check_choice,
    embedding_bits_knob,
    skip_sensitive_knob,
)
from slimkit.quantize.ptq import MAX_ABS_RANGE, finish, quantize_embeddings, target_layers
from slimkit.quantize.recurrent import RECURRENT, quantize_recurrent, recurrent_targets


@technique("quantize.Int8", stage="quantize", search="int8")
@dataclasses.dataclass(frozen=True)
class Int8(PTQConfig):
    """Int8 weights and activations, run on integer kernels.

    ``activations="dynamic"`` quantizes activations per batch at run time (no calibration);
    ``"static"`` uses ranges calibrated once on the task's calibration data with ``calibration``.
    Weights are symmetric int8, ``per_channel`` (one scale per output channel) or ``per_tensor``.
    ``max_drop`` turns on accuracy control: the most sensitive layers go back to float until the
    task metric drops by at most this much. Embedding tables are int8 rows with a scale per row, or
    (``embedding_bits=4``) 4-bit codes in groups of 32 (float16 scale and uint8 zero per group).
    Conv1d layers run as (k, 1) Conv2d (``quantize.conv1d``); with dynamic activations LSTM / GRU
    and their cells get int8 gate matrices (``quantize.recurrent``, torch runtime).
    """

    LAYERS: ClassVar[tuple[type[nn.Module], ...]] = (*PTQConfig.LAYERS, *RECURRENT)

    activations: str = "dynamic"
    calibration: str = "minmax"
    percentile: float = 99.99
    granularity: str = "per_channel"
    symmetric: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("activations", self.activations, ("dynamic", "static"))
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("granularity", self.granularity, ("per_channel", "per_tensor"))
        if not 50.0 < self.percentile <= 100.0:
            raise SlimkitError(f"percentile={self.percentile} is out of range", "use a value in (50, 100], e.g. 99.99")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return quantize_int8(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Int8 | list[BaseConfig]:
        """Static int8 may come with cross-layer equalization before it and bias correction after it
        (booleans ``int8.cle`` / ``int8.bias_correction``, asked where they can act)."""
        activations = trial.suggest_categorical("int8.activations", ["dynamic", "static"])
        calibration = "minmax"
        if activations == "static":
            calibration = trial.suggest_categorical("int8.calibration", ["minmax", "percentile", "entropy", "mse"])
        int8 = cls(activations=activations, calibration=calibration, exclude=skip_sensitive_knob(trial, ctx, "int8"),
                   embedding_bits=embedding_bits_knob(trial, ctx, "int8"))
        if activations != "static":
            return int8
        steps = [equalization_knob(trial, ctx, "int8"), int8, bias_correction_knob(trial, ctx, "int8")]
        return [s for s in steps if s is not None] if steps[0] or steps[2] else int8

    @classmethod
    def presets(cls) -> dict[str, BaseConfig]:
        # asymmetric static: closer to fp32 than symmetric at the same speed on MiniLM (BENCHMARKS.md, quant_cpu)
        return {"int8-dynamic": cls(activations="dynamic"),
                "int8-static": cls(activations="static", calibration="mse", symmetric=False)}



def quantize_int8(model: nn.Module, config: Int8, task: Task | None) -> nn.Module:
    names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=True, recurrent=True)
    recurrent = recurrent_targets(model, config.targets, config.exclude)
    tables = quantize_embeddings(model, config, skipped)  # first, so calibration sees the deployed tables
    ranges: dict[str, tuple[float, float]] = {}
    if config.activations == "static":
        calib = getattr(task, "calib", None) if task is not None else None
        if not calib:
            raise SlimkitError("static int8 needs calibration data and the task has none",
                               "pass a task with calib batches, or use activations='dynamic'")
        observers = collect(model, names, calib, which="input")
        for name in list(names):
            lo, hi = compute_range(observers[name], config.calibration, percentile=config.percentile,
                                   symmetric=config.symmetric, bits=8)
            if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_ABS_RANGE:
                skipped[name] = f"input range [{lo:.3g}, {hi:.3g}] is not a real activation range (mask-like)"
                names.remove(name)
            else:
                ranges[name] = (lo, hi)
    per_channel = config.granularity == "per_channel"
    originals = {name: model.get_submodule(name) for name in names}
    for name, layer in originals.items():
        if isinstance(layer, nn.Conv2d):
            q = QuantConv2d.from_float(layer, activations=config.activations, act_range=ranges.get(name),
                                       per_channel=per_channel, symmetric_act=config.symmetric)
        else:
            q = QuantLinear.from_float(layer, bits=8, group_size=0, activations=config.activations,
                                       act_range=ranges.get(name), per_channel=per_channel,
                                       symmetric_act=config.symmetric)
        set_submodule(model, name, q)
    if config.activations == "dynamic":
        originals.update(quantize_recurrent(model, recurrent, skipped))
    else:
        skipped.update({n: "static int8 has no recurrent kernel: kept float (activations='dynamic' quantizes it)"
                        for n in recurrent})
    return finish(model, config, originals, skipped, task, tables)
