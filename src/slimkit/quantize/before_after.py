"""The report's "SQNR before -> after" per layer: what an algorithm bought over plain round-to-nearest.

A quantize step that ran an algorithm is compared, layer by layer, with the *same* quantization with the
algorithm off, built once for the report (one extra quantization pass, only when an algorithm ran):

* float-preserving rescales run right before the quantize step (SmoothQuant, cross-layer equalization):
  the earlier steps are replayed on ``task.model`` without them, then quantized with the same config;
* the step's own rounding (``WeightOnly`` ``method`` GPTQ / AWQ / AWQ+GPTQ, ``AdaRound(bits=...)``):
  the same config with ``method="rtn"`` / ``iterations=0`` (round to nearest on the same grid);
* a step that refines the one before it (``BiasCorrection``, ``AdaRound()`` re-rounding): the model
  before it is the plain one.

Accuracy control is off in the plain pass (it would re-measure the task metric per layer). Steps that
train (stages ``recover`` and ``nas``) are never replayed: the comparison is left out with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch.nn as nn

from slimkit.core.config import BaseConfig, apply
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_shown
from slimkit.core.record import StepRecord, StepView, records_of
from slimkit.core.registry import technique_named
from slimkit.quantize.awq import scale_and_fold
from slimkit.quantize.layer_error import LayerError, layer_errors_before_after, stored_layers

#: float-preserving rescales that run right before a quantize step, and their names in the report
RESCALES = {"quantize.SmoothQuant": "SmoothQuant", "quantize.CrossLayerEqualization": "CLE"}
#: WeightOnly's rounding methods other than round to nearest
METHODS = {"gptq": "GPTQ", "awq": "AWQ", "awq+gptq": "AWQ+GPTQ"}
#: steps that refine the quantize step before them
REFINES = {"quantize.BiasCorrection": "bias correction", "quantize.AdaRound": "AdaRound"}
#: stages whose steps train or search an architecture: too costly to replay for a report
NOT_REPLAYED = ("recover", "nas")


@dataclasses.dataclass
class Comparison:
    """The models ``layer_errors_before_after`` compares: ``plain`` against ``floats``, the step's result
    against ``float_improved`` (the float model the algorithm quantized, rescaled where it rescales)."""

    algorithm: str
    floats: nn.Module
    plain: nn.Module
    improved: nn.Module
    float_improved: nn.Module


def before_after_errors(record: StepRecord, view: StepView) -> list[LayerError] | str | None:
    """Per-layer errors of the step with ``sqnr_before_db`` filled, a one-line reason when an algorithm ran
    but no "before" can be built, or None when no algorithm ran (the plain table is then the whole story)."""
    try:
        with progress_shown(False):  # the report's own comparison, not a stage the user started
            found = comparison(record, view)
    except SlimkitError as err:  # the plain twin could not be built: the report keeps the plain table
        return f"no SQNR before → after: the comparison model could not be built ({err.problem})"
    if not isinstance(found, Comparison):
        return found
    assert view.task is not None and view.task.calib
    return layer_errors_before_after(found.floats, found.plain, found.improved, view.task.calib,
                                     algorithm=found.algorithm, float_improved=found.float_improved)


def comparison(record: StepRecord, view: StepView) -> Comparison | str | None:
    """The plain twin of the step that added ``record``, when the step ran an algorithm (see the module doc)."""
    task = view.task
    if view.before is None or view.after is None or task is None or not task.calib:
        return None
    history = records_of(view.after)
    at = next((i for i, r in enumerate(history) if r is record), None)
    if at is None:
        at = next((i for i in range(len(history) - 1, -1, -1) if history[i] == record), None)
    if at is None or len(records_of(view.before)) != at:  # view.before must be the model right before the step
        return None
    base = len(records_of(task.model))
    if _refines(record):
        return _refinement(record, view, history, at, base)
    own, plain_config = _own(record)
    start = at
    while start > base and history[start - 1].technique in RESCALES:
        start -= 1
    names = [RESCALES[r.technique] for r in history[start:at]] + ([own] if own else [])
    if not names:
        return None
    algorithm = "+".join(names)
    if stored_layers(view.before):
        return None  # the step re-quantized an already quantized model: no float "before" to compare with
    floats = _replay(task, history[base:start]) if start < at else view.before
    if isinstance(floats, str):
        return f"{algorithm}: no SQNR before ({floats})"
    config = dict(plain_config or record.config)
    if "max_drop" in config:
        config["max_drop"] = None  # accuracy control re-measures the task per layer: not for a report
    plain = apply(floats, BaseConfig.from_dict(config), task).eval()
    float_improved = _awq_scaled(view.before, record, task) if own and own.startswith("AWQ") else view.before
    return Comparison(algorithm, floats, plain, view.after, float_improved)


def _refines(record: StepRecord) -> bool:
    """A step that only re-rounds or corrects the quantize step before it."""
    if record.technique == "quantize.AdaRound":
        return not getattr(record, "quantized", True)
    return record.technique in REFINES


def _refinement(record: StepRecord, view: StepView, history: list[StepRecord], at: int,
                base: int) -> Comparison | str | None:
    """Bias correction / AdaRound re-rounding: the model before the step is the plain one; the float model
    is the one the quantize step before it rounded (earlier steps replayed on ``task.model``)."""
    algorithm = REFINES[record.technique]
    quant = next((i for i in range(at - 1, base - 1, -1) if technique_named(history[i].technique).stage == "quantize"
                  and not _refines(history[i])), None)
    if quant is None or not stored_layers(view.before):
        return None
    floats = _replay(view.task, history[base:quant])
    if isinstance(floats, str):
        return f"{algorithm}: no SQNR before ({floats})"
    return Comparison(algorithm, floats, view.before, view.after, floats)


def _own(record: StepRecord) -> tuple[str | None, dict[str, Any] | None]:
    """The algorithm the quantize step itself ran, and its config with that algorithm off."""
    config = record.config
    if record.technique == "quantize.WeightOnly" and config.get("method", "rtn") in METHODS:
        return METHODS[config["method"]], {**config, "method": "rtn"}
    if record.technique == "quantize.AdaRound" and getattr(record, "quantized", False) and config.get("iterations"):
        return "AdaRound", {**config, "iterations": 0}  # 0 iterations: round to nearest on the same grid
    return None, None


def _replay(task: Any, records: list[StepRecord]) -> nn.Module | str:
    """``task.model`` with ``records``' steps applied again, or why they are not replayed."""
    for r in records:
        if technique_named(r.technique).stage in NOT_REPLAYED:
            return f"replaying the earlier step {r.technique} would train again"
    steps = [BaseConfig.from_dict(r.config) for r in records]
    return apply(task.model, steps, task).eval() if steps else task.model.eval()


def _awq_scaled(floats: nn.Module, record: StepRecord, task: Any) -> nn.Module:
    """The float model with AWQ's scales folded in (the function unchanged, before clipping): the model whose
    inputs the AWQ-rounded layers see. The same deterministic search on the same calibration data as the step."""
    model = copy.deepcopy(floats).eval()
    modules = dict(model.named_modules())
    linears = [n for n in getattr(record, "layers", []) if isinstance(modules.get(n), nn.Linear)]
    scale_and_fold(model, linears, task, int(record.config["group_size"]),
                   gptq=record.config.get("method") == "awq+gptq")
    return model


__all__ = ["Comparison", "before_after_errors", "comparison"]
