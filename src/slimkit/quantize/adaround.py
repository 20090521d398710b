"""``quantize.AdaRound``: choose for each weight whether it rounds up or down (Nagel et al. 2020).

Rounding each weight to its nearest level is optimal per weight, not per layer: the layer's output
error ``||W x - W~ x||^2`` couples the weights through the inputs' correlations. AdaRound learns,
layer by layer on calibration data only, a continuous variable ``V`` per weight with
``W~ = s * (floor(W/s + z) + h(V) - z)``, ``h(V) = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``
(zeta 1.1, gamma -0.1: h reaches exactly 0 and 1), minimising the layer's output error plus
``reg_weight * mean(1 - |2h - 1|^beta)`` with beta annealed from 20 to 2 after a warm-up of 20% of
the iterations, which drives every h to 0 or 1. Then ``h`` is hard-rounded (V >= 0 means up).

The output error on the float inputs captured from calibration data is exact and cheap in Hessian
form, ``mean_rows ||dW x||^2 = tr(dW H dW^T)`` with ``H = X^T X / rows`` (per conv group), from one
calibration pass over every layer at once; layers with more inputs per output than ``samples`` use
that many sampled rows instead. The loss is relative to round-to-nearest's error, so
``reg_weight`` means the same for every layer. A layer whose AdaRound result is not better than
round-to-nearest on this objective keeps its nearest rounding (listed).

Only the stored integers change (the scales and zero points are the quantizer's), so the result is
the usual artifact (``QuantLinear`` / ``QuantConv2d`` / 4-bit ``BitLinear`` / ``BitConv2d``) and every
runtime runs it. Two ways to use it:

* ``AdaRound(bits=4)`` / ``AdaRound(bits=8, activations="static")``: quantize here (int8 through
  ``Int8`` / ``WeightOnly``; int4 per output channel, symmetric -7..7, for Linear and conv layers, or
  grouped like ``WeightOnly`` for Linear layers with ``group_size``), then re-round. ``iterations=0``
  is round-to-nearest on the same grid (the baseline).
* ``[Int8(activations="static"), AdaRound()]`` (``bits=None``): re-round the layers the quantize step
  before it rounded to nearest; their float weights are rebuilt by replaying the earlier steps on
  ``task.model``. Layers whose integers are not the nearest rounding (GPTQ, AWQ) are skipped (listed).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from slimkit.calibrate.obs import gemm_rows
from slimkit.core.config import technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_bar
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record, records_of, set_records
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.formats import pack
from slimkit.quantize.bias_correction import float_reference
from slimkit.quantize.conv1d import lift_conv1d
from slimkit.quantize.extreme_modules import INT4_OFFSET, BitConv2d, BitLinear, int4_per_channel
from slimkit.quantize.int8 import Int8
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.options import QuantConfig, Targets, check_choice, skip_sensitive_knob
from slimkit.quantize.ptq import target_layers
from slimkit.quantize.record import QuantRecord, quant_report_section
from slimkit.quantize.weight_only import WeightOnly

log = logging.getLogger("slimkit.quantize")

ZETA, GAMMA = 1.1, -0.1
#: Below this many multiply-adds per step the per-op overhead dominates and one thread is faster
#: (several threads on a tiny GEMM mostly wait for each other, more so on a shared machine).
ONE_THREAD_BELOW = 50_000_000
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # share of the iterations with the reconstruction loss alone


@technique("quantize.AdaRound", stage="quantize", search="adaround")
@dataclasses.dataclass(frozen=True)
class AdaRound(QuantConfig):
    """Learned up/down rounding of Conv/Linear weights from calibration data (no training labels).

    ``bits``: 8 or 4 to quantize here first, None to re-round the quantize step before this one.
    ``activations`` (8 bits): ``"none"`` (weight-only), ``"dynamic"`` or ``"static"`` (as ``Int8``).
    ``group_size`` (4 bits): 0 = one symmetric scale per output channel for every layer; 32/64/128 =
    grouped asymmetric Linear layers as ``WeightOnly`` (convs stay per channel). ``iterations``: Adam
    steps per layer (0 = round to nearest). ``samples``: input rows kept per layer when its Hessian
    would be larger than that. ``reg_weight``: rounding regulariser strength, relative to the layer's
    round-to-nearest error.
    """

    bits: int | None = None
    activations: str = "none"
    group_size: int = 0
    targets: Targets = "all"
    exclude: Targets = ()
    iterations: int = 500
    samples: int = 2048
    reg_weight: float = 30.0
    lr: float = 0.03

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (None, 8, 4))
        check_choice("activations", self.activations, ("none", "dynamic", "static"))
        check_choice("group_size", self.group_size, (0, 32, 64, 128, 256))
        if self.bits != 8 and self.activations != "none":
            raise SlimkitError(f"activations={self.activations!r} needs bits=8 here",
                               "use bits=8, or put AdaRound() after the Int8 step")
        if self.bits != 4 and self.group_size:
            raise SlimkitError("group_size is for bits=4", "use group_size=0")
        if not (isinstance(self.iterations, int) and 0 <= self.iterations <= 100_000):
            raise SlimkitError(f"iterations={self.iterations!r} is out of range", "use 0..100000, e.g. 500")
        if not (isinstance(self.samples, int) and self.samples >= 16):
            raise SlimkitError(f"samples={self.samples!r} is too small", "use at least 16, e.g. 2048")
        if not (self.reg_weight >= 0 and self.lr > 0):
            raise SlimkitError(f"reg_weight={self.reg_weight} / lr={self.lr} must be >= 0 / > 0",
                               "use e.g. reg_weight=30, lr=0.03")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return adaround(model, self, task)

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        return ctx.has_calibration() and super().applies(ctx)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> AdaRound:
        """int8 (weight-only / dynamic / static) or int4 (per channel or grouped) rounded by AdaRound."""
        bits = trial.suggest_categorical("adaround.bits", [8, 4])
        activations = trial.suggest_categorical("adaround.activations", ["none", "dynamic", "static"]) \
            if bits == 8 else "none"
        group = trial.suggest_categorical("adaround.group_size", [0, 32, 64, 128]) if bits == 4 else 0
        iterations = trial.suggest_categorical("adaround.iterations", [200, 500, 1000])
        return cls(bits=bits, activations=activations, group_size=group, iterations=iterations,
                   exclude=skip_sensitive_knob(trial, ctx, "adaround"))

    @classmethod
    def presets(cls) -> dict[str, AdaRound]:
        return {"w4-adaround": cls(bits=4), "int8-static-adaround": cls(bits=8, activations="static")}

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        if not isinstance(record, AdaRoundRecord):
            return
        quant_report_section(report, record, view)  # per-layer error, SQNR before -> after
        report.heading(f"{record.technique}: layer output MSE on calibration inputs, nearest -> AdaRound")
        report.table(["layer", "nearest", "AdaRound", "kept"],
                     [[n, a, b, "nearest" if n in record.kept_nearest else "AdaRound"]
                      for n, (a, b) in record.rounded.items()])


@dataclasses.dataclass
class AdaRoundRecord(QuantRecord):
    """Per layer ``[nearest MSE, AdaRound MSE]`` on its calibration inputs; layers left at nearest."""

    quantized: bool = False  # True when this step also quantized (bits given), not only re-rounded
    rounded: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    kept_nearest: list[str] = dataclasses.field(default_factory=list)


def adaround(model: nn.Module, config: AdaRound, task: Task | None) -> nn.Module:
    calib = list(getattr(task, "calib", None) or ()) if task is not None else []
    if not calib:
        raise SlimkitError("AdaRound needs calibration data and the task has none",
                           "pass a task with calib batches, or round to nearest with quantize.WeightOnly / Int8")
    if config.bits is None:
        names, skipped, base = [n for n, m in model.named_modules() if isinstance(m, STORED)], {}, None
        if not names:
            raise SlimkitError("AdaRound found no quantized Conv/Linear layer to re-round",
                               "put it after a quantize step, e.g. [Int8(activations='static'), AdaRound()], "
                               "or give it bits=4 / bits=8")
        reference = float_reference(model, task)
    else:
        reference = copy.deepcopy(model)
        base = _quantize(model, config, task)
        names, skipped = list(base.layers), dict(base.skipped)
    if reference is (task.model if task is not None else None):
        reference = copy.deepcopy(reference)  # lifting a Conv1d below must not touch the task's model
    rounded, kept = reround(model, reference, [n for n in names if n not in skipped], calib, config, skipped)
    for name, reason in skipped.items():
        log.info("AdaRound left %s as it was (%s)", name, reason)
    record = AdaRoundRecord(config.type_name, config.to_dict(), skipped, layers=list(base.layers) if base else [],
                            embeddings=list(base.embeddings) if base else [], quantized=base is not None,
                            rounded=rounded, kept_nearest=kept)
    add_record(model, record)
    return model


def _quantize(model: nn.Module, config: AdaRound, task: Task) -> QuantRecord:
    """Round to nearest on the grid ``config`` asks for; the quantizer's record is returned, not kept."""
    before = records_of(model)
    if config.bits == 8 and config.activations != "none":
        Int8(activations=config.activations, targets=config.targets, exclude=config.exclude, embeddings=False,
             calibration="mse" if config.activations == "static" else "minmax").apply_to(model, task)
    elif config.bits == 8 or config.group_size:
        WeightOnly(bits=config.bits, group_size=config.group_size, targets=config.targets, exclude=config.exclude,
                   embeddings=False).apply_to(model, task)
    else:  # every Conv/Linear symmetric int4 per output channel
        names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=True)
        for name in names:
            layer = model.get_submodule(name)
            if not torch.isfinite(layer.weight).all():
                raise SlimkitError(f"layer {name!r} has NaN or Inf weights", "fix the model before quantizing it")
            set_submodule(model, name, int4_per_channel(layer))
        add_record(model, QuantRecord(config.type_name, config.to_dict(), skipped, layers=names))
    record = records_of(model)[-1]
    set_records(model, before)
    assert isinstance(record, QuantRecord)
    return record


STORED = (QuantLinear, QuantConv2d, BitLinear, BitConv2d)


@dataclasses.dataclass
class _Grid:
    """A layer's stored integers as ``w = (q - zero) * scale`` per weight, all (N, K)."""

    q: Tensor
    scale: Tensor
    zero: Tensor
    qmin: float
    qmax: float
    write: Callable[[Tensor], None]


def _grid(layer: nn.Module) -> _Grid | str:
    """The grid of a stored layer, or why AdaRound cannot re-round it."""
    if isinstance(layer, (QuantLinear, QuantConv2d)):
        n = layer.qweight.shape[0]
        if getattr(layer, "bits", 8) == 8:
            q = layer.qweight.reshape(n, -1).float()  # (N, K)

            def write8(codes: Tensor) -> None:
                layer.qweight.copy_(codes.reshape(layer.qweight.shape).to(torch.int8))
                layer.reset_cache()
            scale = layer.weight_scale.float().reshape(-1, 1).expand_as(q)
            return _Grid(q, scale, torch.zeros_like(q), -pack.INT8_MAX, pack.INT8_MAX, write8)
        q = pack.unpack_int4(layer.qweight).float()  # (N, K)

        def write4(codes: Tensor) -> None:
            layer.qweight.copy_(pack.pack_int4(codes.to(torch.uint8)))
            layer.reset_cache()
        g = layer.group_size
        return _Grid(q, layer.weight_scale.float().repeat_interleave(g, 1),
                     layer.weight_zero.float().repeat_interleave(g, 1), 0, pack.INT4_LEVELS, write4)
    if isinstance(layer, (BitLinear, BitConv2d)) and layer.bits == 4:
        q = pack.unpack_int4(layer.packed)[:, :layer.cols].float() - INT4_OFFSET  # (N, K)

        def write_bits(codes: Tensor) -> None:
            layer.fill((codes + INT4_OFFSET).to(torch.uint8), layer.scale_pos, layer.scale_neg, layer.bias)
        scale = layer.scale_pos.float().reshape(-1, 1).expand_as(q)
        return _Grid(q, scale, torch.zeros_like(q), -7, 7, write_bits)
    if isinstance(layer, (BitLinear, BitConv2d)):
        return f"{layer.bits}-bit binary/ternary codes are not a rounding grid"
    return f"{type(layer).__name__} is not re-rounded by AdaRound (QuantLinear/QuantConv2d/4-bit Bit* layers only)"


def _float_twin(reference: nn.Module, name: str) -> nn.Module | str:
    """The float Linear/Conv2d ``name`` of ``reference``; a Conv1d the quantizer ran as (k, 1) is lifted too."""
    modules = dict(reference.named_modules())
    parent = name.rsplit(".", 1)[0] if name.endswith(".conv") else None
    if name not in modules and parent is not None and isinstance(modules.get(parent), nn.Conv1d):
        lift_conv1d(reference, parent)
        modules = dict(reference.named_modules())
    twin = modules.get(name)
    if not isinstance(twin, (nn.Linear, nn.Conv2d)):
        return "no float Linear/Conv2d of this name in the replayed task.model"
    return twin


def reround(model: nn.Module, reference: nn.Module, names: list[str], calib: list[Any], config: AdaRound,
            skipped: dict[str, str]) -> tuple[dict[str, list[float]], list[str]]:
    """Re-round ``names`` in ``model`` in place from ``reference``'s float layers; fills ``skipped``."""
    todo: dict[str, tuple[nn.Module, _Grid, Tensor]] = {}
    for name in names:
        grid, twin = _grid(model.get_submodule(name)), _float_twin(reference, name)
        why = grid if isinstance(grid, str) else twin if isinstance(twin, str) else None
        if why is None:
            w = twin.weight.detach().float().reshape(grid.q.shape[0], -1)  # (N, K)
            if w.shape != grid.q.shape:
                why = "the float weight's shape differs from the quantized one"
            elif not torch.isfinite(w).all():
                raise SlimkitError(f"layer {name!r} has NaN or Inf weights", "fix the model before quantizing it")
            elif bool(((w / grid.scale + grid.zero - grid.q).abs() > 0.5 + 1e-3).any()):
                why = "its integers are not the float weights rounded to nearest (GPTQ / AWQ chose them): kept"
        if why is not None:
            skipped[name] = why
        else:
            todo[name] = (twin, grid, w)
    stats = _input_stats(reference, {n: t for n, (t, _, _) in todo.items()}, calib, config.samples)
    rounded, kept = {}, []
    with progress_bar(bool(todo) and config.iterations > 0) as bar:
        task_id = bar.add_task("AdaRound", total=len(todo) * config.iterations, info="") if bar is not None else None
        for name, (twin, grid, w) in todo.items():
            if name not in stats:
                skipped[name] = "did not run on the calibration batches"
                continue
            q, nearest, best = _optimise(w, grid, stats[name], config, bar, task_id, name)
            rounded[name] = [nearest, best]
            if best < nearest:
                with torch.no_grad():
                    grid.write(q)
            else:
                kept.append(name)
    return rounded, kept


@dataclasses.dataclass
class _Stats:
    """A layer's inputs per group: ``hessian`` (G, Kg, Kg) = X^T X / rows, or ``rows`` (G, R, Kg) sampled."""

    groups: int
    hessian: Tensor | None = None
    rows: Tensor | None = None


@torch.no_grad()
def _input_stats(reference: nn.Module, twins: dict[str, nn.Module], calib: list[Any], samples: int
                 ) -> dict[str, _Stats]:
    """One pass over the calibration batches on the float model: every layer's input statistics."""
    sums: dict[str, Tensor] = {}
    kept: dict[str, list[Tensor]] = {}
    count: dict[str, int] = {}
    generator = torch.Generator().manual_seed(0)
    per_batch = max(1, -(-samples // len(calib)))

    def hook(name: str, layer: nn.Module) -> Callable[..., None]:
        groups = getattr(layer, "groups", 1)

        def observe(module: nn.Module, args: tuple) -> None:
            x = gemm_rows(module, args[0].detach().float())  # (rows, K)
            x = x.reshape(x.shape[0], groups, -1).transpose(0, 1)  # (G, rows, Kg)
            if x.shape[-1] > samples:  # a (G, Kg, Kg) Hessian would cost more than the rows
                pick = torch.randperm(x.shape[1], generator=generator)[:per_batch]
                kept.setdefault(name, []).append(x[:, pick])
            else:
                sums[name] = sums.get(name, 0) + torch.bmm(x.transpose(1, 2).double(), x.double())
            count[name] = count.get(name, 0) + x.shape[1]
        return observe

    handles = [t.register_forward_pre_hook(hook(n, t)) for n, t in twins.items()]
    was_training = reference.training
    reference.eval()
    try:
        for batch in calib:
            reference(*(tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)))
    finally:
        for h in handles:
            h.remove()
        reference.train(was_training)
    out = {n: _Stats(getattr(twins[n], "groups", 1), hessian=(s / count[n]).float()) for n, s in sums.items()}
    out.update({n: _Stats(getattr(twins[n], "groups", 1), rows=torch.cat(r, 1)[:, :samples]) for n, r in kept.items()})
    return out


def _error(dw: Tensor, stats: _Stats) -> Tensor:
    """Mean squared output error of a weight change ``dw`` (N, K) on the layer's inputs."""
    g = stats.groups
    d = dw.reshape(g, dw.shape[0] // g, -1)  # (G, O/G, Kg)
    if stats.hessian is not None:
        return (torch.bmm(d, stats.hessian) * d).sum() / dw.shape[0]
    r = stats.rows  # (G, R, Kg)
    return torch.bmm(d, r.transpose(1, 2)).pow(2).sum() / (dw.shape[0] * r.shape[1])


def _optimise(w: Tensor, grid: _Grid, stats: _Stats, config: AdaRound, bar: Any, task_id: Any,
              name: str) -> tuple[Tensor, float, float]:
    """(AdaRound integers (N, K), nearest's error, AdaRound's error) for one layer."""
    levels = w / grid.scale + grid.zero  # (N, K) the weight in units of the grid step
    floor = torch.floor(levels)

    def weight(q: Tensor) -> Tensor:
        return (q.clamp(grid.qmin, grid.qmax) - grid.zero) * grid.scale

    with torch.no_grad():
        nearest = float(_error(weight(grid.q) - w, stats))
    if config.iterations == 0 or nearest <= 0:
        return grid.q, nearest, nearest
    rest = (levels - floor).clamp(0, 1)
    p = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p / (1 - p)).requires_grad_(True)  # h(v) == rest: starts at the float weight
    opt = torch.optim.Adam([v], lr=config.lr)
    warm, threads = int(WARMUP * config.iterations), torch.get_num_threads()
    inner = stats.hessian.shape[-1] if stats.hessian is not None else stats.rows.shape[1]
    if w.numel() * inner < ONE_THREAD_BELOW:  # multiply-adds of one objective evaluation
        torch.set_num_threads(1)
    try:
        for step in range(config.iterations):
            h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)  # (N, K) in [0, 1]
            loss = _error(weight(floor + h) - w, stats) / nearest
            if step >= warm:  # beta 20 -> 2: first only h near 0 / 1 are pulled there, at the end all are
                beta = BETA_END + (BETA_START - BETA_END) * (1 - (step - warm) / max(1, config.iterations - warm))
                loss = loss + config.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None and (step % 50 == 49 or step == config.iterations - 1):
                bar.update(task_id, advance=step % 50 + 1, info=f"{name} loss {float(loss.detach()):.3f}")
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        q = (floor + (v >= 0).float()).clamp(grid.qmin, grid.qmax)  # h >= 0.5 exactly where v >= 0: up
        return q, nearest, float(_error(weight(q) - w, stats))
