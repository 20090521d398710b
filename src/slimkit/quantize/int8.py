"""``quantize.Int8``: int8 weights and activations (dynamic or calibrated static), run on integer kernels."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch.nn as nn

from slimkit.calibrate.blockwise import calibrate_blockwise
from slimkit.calibrate.ranges import compute_range, observer_hooks
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



def quantize_int8(model: nn.Module, config: Int8, task: Task | None, *, blockwise: bool = True) -> nn.Module:
    """``config`` applied in place. Static ranges are observed one repeated block at a time
    (``calibrate.blockwise``, passing on float outputs: the same ranges as one whole-model pass),
    each block's layers swapped as soon as its ranges are known; ``blockwise=False``: one pass first."""
    names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=True, recurrent=True)
    recurrent = recurrent_targets(model, config.targets, config.exclude)
    tables = quantize_embeddings(model, config, skipped)  # first, so calibration sees the deployed tables
    keep = config.max_drop is not None  # the float layers are kept only for accuracy control to restore
    done: dict[str, nn.Module | None] = {}

    def swap(name: str, act_range: tuple[float, float] | None) -> None:
        layer = model.get_submodule(name)
        set_submodule(model, name, _int8_layer(layer, config, act_range))
        done[name] = layer if keep else None

    if config.activations == "static":
        calib = getattr(task, "calib", None) if task is not None else None
        if not calib:
            raise SlimkitError("static int8 needs calibration data and the task has none",
                               "pass a task with calib batches, or use activations='dynamic'")

        def quantize_block(observers: dict) -> None:
            for name, observer in observers.items():
                lo, hi = compute_range(observer, config.calibration, percentile=config.percentile,
                                       symmetric=config.symmetric, bits=8)
                if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_ABS_RANGE:
                    skipped[name] = f"input range [{lo:.3g}, {hi:.3g}] is not a real activation range (mask-like)"
                else:
                    swap(name, (lo, hi))

        calibrate_blockwise(model, names, calib, observer_hooks, quantize_block, propagate="float",
                            blocks=None if blockwise else [], label="static int8 ranges")
    else:
        for name in names:
            swap(name, None)
    originals = {name: done[name] for name in names if name in done}  # in the targets' order
    if config.activations == "dynamic":
        originals.update(quantize_recurrent(model, recurrent, skipped))
    else:
        skipped.update({n: "static int8 has no recurrent kernel: kept float (activations='dynamic' quantizes it)"
                        for n in recurrent})
    return finish(model, config, originals, skipped, task, tables)


def _int8_layer(layer: nn.Module, config: Int8, act_range: tuple[float, float] | None) -> nn.Module:
    per_channel = config.granularity == "per_channel"
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d.from_float(layer, activations=config.activations, act_range=act_range,
                                      per_channel=per_channel, symmetric_act=config.symmetric)
    return QuantLinear.from_float(layer, bits=8, group_size=0, activations=config.activations, act_range=act_range,
                                  per_channel=per_channel, symmetric_act=config.symmetric)
