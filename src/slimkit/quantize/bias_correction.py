"""``quantize.BiasCorrection``: remove the mean output shift that rounding puts into each quantized layer
(Nagel et al. 2019). It runs after a quantize step: ``[CrossLayerEqualization(), Int8(...), BiasCorrection()]``.

Rounding errors in a channel's weights rarely cancel: ``E[W_q x] - E[W x]`` is a per-output-channel
shift that every later layer sees. Subtracting it from the bias (one is created where the layer has
none) costs nothing at run time; the corrected ``bias`` buffer is what every runtime, ONNX Runtime
included, runs.

* ``empirical`` (calibration data): layer by layer in execution order, each quantized layer's own
  output on the *quantized* model's inputs (earlier layers already corrected, so errors do not
  compound) is compared with the float weights on the same inputs; activation rounding counts too.
* ``analytic`` (no calibration data): ``(W_q - W) E[x]`` with ``E[x]`` from the BatchNorm feeding
  the layer (its output per channel ~ N(beta, gamma^2); after a ReLU, ``E[x] = mu Phi(mu/sigma) +
  sigma phi(mu/sigma)``). Layers with no such BatchNorm are skipped (listed); zero padding is ignored.

The float weights the quantizer rounded are rebuilt by replaying the model's earlier recorded steps
on ``task.model``, and each is checked to round to the stored integers (else the layer is skipped).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.config import BaseConfig, apply, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record, records_of
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.record import QuantRecord, quant_report_section

MODES = ("auto", "empirical", "analytic")


@technique("quantize.BiasCorrection", stage="quantize")
@dataclasses.dataclass(frozen=True)
class BiasCorrection(BaseConfig):
    """Subtract each int8 layer's mean output error from its bias (after a quantize step).

    ``mode``: ``"empirical"`` (task calibration data), ``"analytic"`` (preceding BatchNorm statistics)
    or ``"auto"`` (empirical when the task has calibration data).
    """

    version: ClassVar[int] = 1
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SlimkitError(f"BiasCorrection mode={self.mode!r} is not known", f"use one of {', '.join(MODES)}")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return correct_bias(model, self, task)

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        if not isinstance(record, BiasCorrectionRecord):
            return
        quant_report_section(report, record, view)  # per-layer SQNR before -> after
        report.heading(f"{record.technique} ({record.mode}): {len(record.corrected)} layer(s) corrected")
        report.table(["layer", "mean |bias change|"], [[n, v] for n, v in record.corrected.items()])
        if record.skipped:
            report.table(["layer", "reason it was not corrected"], [[n, why] for n, why in record.skipped.items()])


def bias_correction_knob(trial: Any, ctx: SearchContext, prefix: str) -> BiasCorrection | None:
    """``{prefix}.bias_correction``: correct the int8 layers' mean output shift right after the quantize step
    (a boolean). Asked only with calibration data: the search measures the empirical shift; the analytic
    estimate (BatchNorm statistics) is for callers without data."""
    if not ctx.has_calibration():
        return None
    return BiasCorrection(mode="empirical") if trial.suggest_categorical(f"{prefix}.bias_correction",
                                                                         [False, True]) else None


@dataclasses.dataclass
class BiasCorrectionRecord(StepRecord):
    """How the shift was estimated, and each corrected layer's mean |bias change|."""

    mode: str = "empirical"
    corrected: dict[str, float] = dataclasses.field(default_factory=dict)


class _Reached(Exception):
    """Raised by a hook to stop a forward pass once the layer being measured has run."""


def correct_bias(model: nn.Module, config: BiasCorrection, task: Task | None) -> nn.Module:
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear)) and
                 getattr(m, "bits", 8) == 8}
    if not quantized:
        raise SlimkitError("BiasCorrection found no int8 QuantConv2d/QuantLinear layer to correct",
                           "put it after a quantize step, e.g. [Int8(activations='static'), BiasCorrection()]")
    if task is None:
        raise SlimkitError("BiasCorrection needs the task (its model holds the float weights the quantizer rounded)",
                           "pass the task to sk.apply, or replay the recipe on it")
    calib = list(task.calib or ())
    mode = config.mode if config.mode != "auto" else ("empirical" if calib else "analytic")
    if mode == "empirical" and not calib:
        raise SlimkitError("BiasCorrection(mode='empirical') needs calibration data and the task has none",
                           "pass a task with calib batches, or use mode='analytic'")
    reference = float_reference(model, task)
    skipped: dict[str, str] = {}
    floats = {}
    for name, layer in quantized.items():
        why = _rounding_mismatch(layer, reference, name)
        if why:
            skipped[name] = why
        else:
            floats[name] = reference.get_submodule(name)
    if not floats:
        raise SlimkitError("BiasCorrection cannot find the float weights the quantizer rounded in task.model",
                           "apply it in the same sk.apply / recipe as the quantize step, with the task whose model "
                           "was quantized")
    was_training = model.training
    model.eval()
    if mode == "empirical":
        shifts = _empirical(model, floats, calib, skipped)  # subtracted as it goes
    else:
        shifts = _analytic(reference, quantized, floats, skipped)
        for name, shift in shifts.items():
            _subtract(quantized[name], shift)
    corrected = {name: float(shift.abs().mean()) for name, shift in shifts.items()}
    model.train(was_training)
    add_record(model, BiasCorrectionRecord(config.type_name, config.to_dict(), skipped, mode=mode, corrected=corrected))
    return model


def float_reference(model: nn.Module, task: Task) -> nn.Module:
    """``task.model`` with the steps recorded on ``model`` before its last quantize step replayed."""
    history, base = records_of(model), len(records_of(task.model))
    last = max((i for i, r in enumerate(history) if isinstance(r, QuantRecord)), default=None)
    if last is None or last < base:
        raise SlimkitError("BiasCorrection found no quantize step in the model's history after task.model",
                           "apply it in the same sk.apply / recipe as the quantize step")
    steps = [BaseConfig.from_dict(r.config) for r in history[base:last]]
    return apply(task.model, steps, task).eval() if steps else task.model.eval()


def _rounding_mismatch(layer: QuantConv2d | QuantLinear, reference: nn.Module, name: str) -> str | None:
    """Why ``reference[name]`` is not the float layer ``layer`` was rounded from (None when it is)."""
    try:
        twin = reference.get_submodule(name)
    except AttributeError:
        return "no float layer of this name in the replayed task.model"
    if not isinstance(twin, (nn.Conv2d, nn.Linear)):
        return f"the float layer is a {type(twin).__name__}, not a Conv2d/Linear"
    deq = layer.dequantized_weight()
    if twin.weight.shape != deq.shape:
        return "the float weight's shape differs from the quantized one"
    step = layer.weight_scale.reshape(-1, *([1] * (deq.dim() - 1)))  # (O, 1, ...) or (1, 1, ...)
    if bool(((twin.weight.detach() - deq).abs() > 0.5 * step * 1.001 + 1e-12).any()):
        return "the float weights in task.model do not round to the stored integers"
    return None


@torch.no_grad()
def _float_output(twin: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if isinstance(twin, nn.Conv2d):
        return F.conv2d(x, twin.weight, bias, twin.stride, twin.padding, twin.dilation, twin.groups)
    return F.linear(x, twin.weight, bias)


def _channel_mean(y: torch.Tensor, conv: bool) -> tuple[torch.Tensor, int]:
    """Per-channel sum and count of ``y`` (B, C, H, W) or (..., C)."""
    if conv:
        return y.sum(dim=(0, 2, 3)), y.numel() // y.shape[1]
    return y.reshape(-1, y.shape[-1]).sum(0), y.numel() // y.shape[-1]


@torch.no_grad()
def _empirical(model: nn.Module, floats: dict[str, nn.Module], calib: list[Any],
               skipped: dict[str, str]) -> dict[str, torch.Tensor]:
    """Subtract each layer's mean (quantized - float) output per channel, measured on the quantized model's
    own inputs in execution order; returns the shifts."""
    order: list[str] = []

    def seen(name: str) -> None:
        if name not in order:
            order.append(name)

    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen(n)) for n in floats]
    try:
        model(*_inputs(calib[0]))
    finally:
        for h in hooks:
            h.remove()
    skipped.update({n: "did not run on the calibration batches" for n in floats if n not in order})
    shifts: dict[str, torch.Tensor] = {}
    for name in order:
        layer, twin = model.get_submodule(name), floats[name]
        total, count = [0.0], [0]

        def measure(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor,
                    twin: nn.Module = twin) -> None:
            x = inputs[0].float()
            err = out.float() - _float_output(twin, x, m.bias)  # (B, C, H, W) or (..., C)
            s, c = _channel_mean(err, isinstance(twin, nn.Conv2d))
            total[0], count[0] = total[0] + s, count[0] + c
            raise _Reached

        handle = layer.register_forward_hook(measure)
        try:
            for batch in calib:
                try:
                    model(*_inputs(batch))
                except _Reached:
                    pass
        finally:
            handle.remove()
        shift = total[0] / max(count[0], 1)
        _subtract(layer, shift)  # corrected before the next layer's inputs are measured
        shifts[name] = shift
    return shifts


def _inputs(batch: Any) -> tuple[torch.Tensor, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _subtract(layer: QuantConv2d | QuantLinear, shift: torch.Tensor) -> None:
    """bias -= shift, creating a bias buffer where the layer has none; drops kernel repacks that hold the bias."""
    if layer.bias is None:
        layer.bias = torch.zeros_like(shift)
    layer.bias.sub_(shift.to(layer.bias.dtype))
    layer.reset_cache()


def _analytic(reference: nn.Module, quantized: dict[str, nn.Module], floats: dict[str, nn.Module],
              skipped: dict[str, str]) -> dict[str, torch.Tensor]:
    """``(W_q - W) E[x]`` with E[x] from the BatchNorm (optionally + ReLU) feeding each layer."""
    try:
        graph = torch.fx.symbolic_trace(reference).graph
    except Exception as exc:  # noqa: BLE001 - no graph, no way to find the BatchNorm before a layer
        skipped.update({n: f"no calibration data and the model does not trace with torch.fx ({type(exc).__name__})"
                        for n in floats})
        return {}
    modules = dict(reference.named_modules())
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    shifts = {}
    for name, twin in floats.items():
        mean = _expected_input(nodes.get(name), modules)
        if isinstance(mean, str):
            skipped[name] = mean
            continue
        delta = (quantized[name].dequantized_weight() - twin.weight.detach()).double()  # (O, C/g, ...)
        if isinstance(twin, nn.Linear):
            shifts[name] = (delta @ mean).float()  # (O,)
        elif twin.groups == 1:
            shifts[name] = (delta.sum(dim=(2, 3)) @ mean).float()  # (O,)
        elif twin.groups == twin.in_channels == twin.out_channels:
            shifts[name] = (delta.sum(dim=(1, 2, 3)) * mean).float()  # (O,)
        else:
            skipped[name] = "grouped conv: the analytic correction handles dense and depthwise convs only"
    return shifts


def _expected_input(node: torch.fx.Node | None, modules: dict[str, nn.Module]) -> torch.Tensor | str:
    """E[x] per input channel (float64) from a BatchNorm [-> ReLU] feeding ``node``, or why not."""
    none = "no calibration data and no BatchNorm (-> ReLU) right before it to estimate E[x]"
    src = node.args[0] if node is not None and node.args else None
    relu = False
    if isinstance(src, torch.fx.Node) and ((src.op == "call_module" and isinstance(modules[src.target], nn.ReLU))
                                           or (src.op == "call_function" and src.target in (F.relu, torch.relu))):
        relu, src = True, src.args[0]
    if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
            and isinstance(modules[src.target], nn.BatchNorm2d) and modules[src.target].affine):
        return none
    bn = modules[src.target]
    mu, sigma = bn.bias.detach().double(), bn.weight.detach().double().abs().clamp_min(1e-12)  # (C,)
    if not relu:
        return mu
    z = mu / sigma
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return mu * cdf + sigma * pdf
