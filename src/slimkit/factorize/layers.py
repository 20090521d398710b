"""What the three factorizations share: which layers they touch, validation, swapping and the record.

Every handler walks the chosen Linear/Conv2d layers, decides a factorized replacement or a
reason to leave the layer alone (a factorized form that is not smaller, a grouped conv...), swaps
the module in place and adds a :class:`FactorizeRecord`: per layer the ranks and parameter counts
before/after, the skipped layers with their reasons, and the totals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, ClassVar

import torch.nn as nn

from slimkit.core.config import BaseConfig
from slimkit.core.editing import read_directly, select, set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.graph.dependency import output_layer

log = logging.getLogger("slimkit.factorize")

#: ``plan(name, layer) -> (new module, info dict)`` or a string: the reason to skip the layer.
Plan = Callable[[str, nn.Module], "tuple[nn.Module, dict[str, Any]] | str"]


def check_ratio(name: str, value: float | None, *, optional: bool = False) -> None:
    """Ratios are fractions of the parameters kept: in (0, 1]."""
    if value is None and optional:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < float(value) <= 1.0:
        raise SlimkitError(f"{name}={value!r} is out of range", "use a fraction of the parameters to keep in (0, 1]")


def check_multiple(value: int) -> None:
    """``rank_multiple`` must be a positive whole number (1 = ranks as computed)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SlimkitError(f"rank_multiple={value!r} is invalid",
                           "use a positive whole number, e.g. 8 (the CPU kernels' channel block) or 1 to keep ranks")


ALLOCATIONS = ("uniform", "sensitivity")


def check_allocation(allocation: str, fixed_ranks: bool) -> None:
    if allocation not in ALLOCATIONS:
        raise SlimkitError(f"allocation={allocation!r} is not supported", f"use one of {ALLOCATIONS}")
    if allocation == "sensitivity" and fixed_ranks:
        raise SlimkitError("fixed ranks and allocation='sensitivity' both choose the ranks",
                           "give one: the ranks, or a ratio with allocation='sensitivity'")


def round_rank(rank: int, multiple: int, limit: int) -> int:
    """``rank`` moved to the nearest multiple of ``multiple`` (at least one multiple, at most ``limit``).

    Why: CPU conv/GEMM kernels work on channel blocks (ONNX Runtime's NCHWc uses 8 on AVX2, 16 on
    AVX-512); a rank of 13 is padded or re-laid out on every call, so 16 can run faster than 13.
    """
    if multiple <= 1:
        return min(rank, limit)
    return min(limit, max(multiple, multiple * math.floor(rank / multiple + 0.5)))  # halves round up


def chosen_layers(model: nn.Module, targets: Any, exclude: Any, technique: str) -> list[str]:
    """Linear/Conv2d names picked by ``targets`` minus ``exclude``; an empty choice is an error."""

    names = select(model, targets, exclude)
    if not names:
        raise SlimkitError(f"{technique}: targets={targets!r} matched no Linear or Conv2d layer",
                           "use 'all', 'all-linear', a regex or names from model.named_modules()")
    return names


def weight_params(layer: nn.Module) -> int:
    """Parameters of a layer's weight and bias (what a factorization replaces)."""
    return sum(p.numel() for p in layer.parameters(recurse=False))


def unsupported_reason(layer: nn.Module) -> str | None:
    """Why a chosen layer cannot be factorized at all, or None."""
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return f"grouped conv (groups={layer.groups}): already factorized along channels"
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}: only zero padding splits across factors"
        if isinstance(layer.padding, str):
            return f"padding={layer.padding!r}: give explicit padding"
        return None
    if isinstance(layer, nn.Linear):
        return None
    return f"{type(layer).__name__} is not a Linear or Conv2d"


def output_layer_name(model: nn.Module, task: Task) -> str | None:
    """The last Linear/Conv that runs on the task's example (a classifier head), or None without a task."""
    if task is None or not getattr(task, "example", None):
        return None
    return output_layer(model, tuple(task.example))


def factorize_layers(model: nn.Module, config: BaseConfig, names: list[str], plan: Plan,
                     task: Task | None = None) -> nn.Module:
    """Swap each named layer for ``plan``'s module (or record why not) and add the step's record.

    With ``config.keep_output`` the model's output layer stays whole: a rank-2 classifier over ten
    classes cannot separate them, and the head holds few of a model's weights.
    """
    layers: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    head = output_layer_name(model, task) if getattr(config, "keep_output", False) else None
    if head in names:
        names = [n for n in names if n != head]
        skipped[head] = "the model's output layer (keep_output=True)"
    before_total = sum(p.numel() for p in model.parameters())
    direct = read_directly(model)
    for name in names:
        layer = model.get_submodule(name)
        result = direct.get(name) or unsupported_reason(layer) or plan(name, layer)
        if isinstance(result, str):
            skipped[name] = result
            log.info("%s: %s left as it is (%s)", config.type_name, name, result)
            continue
        module, info = result
        module.to(device=layer.weight.device, dtype=layer.weight.dtype)
        set_submodule(model, name, module)
        layers[name] = {**info, "params_before": weight_params(layer),
                        "params_after": sum(p.numel() for p in module.parameters())}
    add_record(model, FactorizeRecord(config.type_name, config.to_dict(), skipped, layers=layers,
                                      params=[before_total, sum(p.numel() for p in model.parameters())]))
    return model


#: Convs reading this few channels (image inputs) are left whole by Tucker/CP: a handful of weights,
#: and a rank-1 or rank-2 input factor would throw away the colour/intensity information.
MIN_IN_CHANNELS = 4


def is_spatial(layer: nn.Module) -> bool:
    """A conv with a kernel larger than 1x1 (the layers Tucker/CP decompose; the rest get SVD)."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.weight.shape[2:]) != (1, 1)


def too_few_inputs(conv: nn.Conv2d) -> str | None:
    if conv.in_channels < MIN_IN_CHANNELS:
        return f"only {conv.in_channels} input channel(s): an input layer with {weight_params(conv)} params"
    return None


def not_smaller(after: int, before: int) -> str | None:
    """The skip reason when a factorized form would not have fewer parameters than the layer."""
    if after >= before:
        return f"factorized form has {after} params, not fewer than the layer's {before}"
    return None


@dataclasses.dataclass
class FactorizeRecord(StepRecord):
    """Per factorized layer: method, rank(s), parameters before and after; and the model's totals."""

    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    params: list[int] = dataclasses.field(default_factory=list)  # [before, after] for the whole model


def factorize_report_section(report: ReportSection, record: StepRecord, view: StepView) -> None:
    if not isinstance(record, FactorizeRecord):
        return
    before, after = record.params
    report.heading(f"{record.technique}: factorized layers")
    report.note(f"parameters {before} -> {after} ({before / max(after, 1):.2f}x fewer)")
    rows = [[n, v["method"], str(v["rank"]), v["params_before"], v["params_after"],
             v["params_after"] / v["params_before"]] for n, v in record.layers.items()]
    report.table(["layer", "method", "rank", "params before", "params after", "kept"], rows)
    if record.layers:
        names = list(record.layers)
        report.bar_plot("parameters per layer", names, {"before": [record.layers[n]["params_before"] for n in names],
                                                        "after": [record.layers[n]["params_after"] for n in names]},
                        "parameters")
    if record.skipped:
        report.heading("Layers left intact")
        report.table(["layer", "reason"], [[n, why] for n, why in record.skipped.items()])


@dataclasses.dataclass(frozen=True)
class FactorizeConfig(BaseConfig):
    """What SVD, Tucker and CP configs share: offered where the model has layers the method decomposes
    (``spatial``: kxk convs), and one report section."""

    spatial: ClassVar[bool] = True

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        return has_layers(ctx, spatial=cls.spatial)

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        factorize_report_section(report, record, view)


def has_layers(ctx: SearchContext, spatial: bool) -> bool:
    """Whether the task's model has layers a method decomposes (kxk convs for Tucker/CP)."""
    layers = [m for m in ctx.task.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return any(is_spatial(m) for m in layers) if spatial else bool(layers)

