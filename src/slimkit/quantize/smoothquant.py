"""``quantize.SmoothQuant``: move activation outliers into the weights before static int8 (Xiao et al. 2023).

Per input channel j of a Linear, ``s_j = max|X_j|**alpha / max|W[:, j]|**(1 - alpha)``. The op that
produces X (a LayerNorm's weight and bias, or a Linear's output rows) is divided by ``s`` and the
Linear's columns multiplied by it, so the float model computes the same function with no extra op at
run time, while a per-tensor activation scale no longer has to cover a few huge channels.

Producers are found at run time: the Linear's input tensor is the very output tensor of a LayerNorm,
RMSNorm or Linear. Linears fed by the same tensor (q, k, v after one LayerNorm) share one scale.
Inside an attention block the value projection feeds the output projection through a per-channel
linear mix (softmax weights over tokens), so ``v -> o`` folds too. Every fold is checked on a
calibration batch: when the producer's output is also used elsewhere (a post-norm residual, as in
BERT, where the LayerNorm output is the residual stream) the output changes, the fold is undone and
the layer is listed as skipped with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.graph.attention import attention_blocks

#: alphas ``alpha="auto"`` tries per layer group.
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: calibration rows kept per group to score alphas (a few hundred rows pin down a layer's error).
_SAMPLE_ROWS = 512
#: a fold "preserves the function" when the outputs move by at most this, relative to their size.
_FOLD_TOL = 1e-4
#: activation clipping ratios the auto score tries, so it sees ranges as MSE calibration would pick them.
_CLIPS = (1.0, 0.8, 0.6, 0.4)
_OUT_PROJ_NAMES = ("out_lin", "o_proj", "out_proj")


@technique("quantize.SmoothQuant", stage="fuse", search="smoothquant")
@dataclasses.dataclass(frozen=True)
class SmoothQuant(BaseConfig):
    """Rescale activation channels into the weights (float function unchanged) so static int8 loses less.

    ``alpha`` in [0, 1] is the migration strength (0.5 = split the range evenly), or ``"auto"``: per
    group, the alpha of ``ALPHA_GRID`` with the least int8 output error on calibration rows (a group
    that no alpha improves is left alone). Needs the task's calibration data. Put it before
    ``Int8(activations="static")``; it runs in the "fuse" stage.
    """

    version: ClassVar[int] = 1
    alpha: float | str = 0.5
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ok = self.alpha == "auto" or (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                      and 0.0 <= float(self.alpha) <= 1.0)
        if not ok:
            raise SlimkitError(f"SmoothQuant alpha={self.alpha!r} is not valid", "use a number in [0, 1] or 'auto'")
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return smooth(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> SmoothQuant:
        return cls(alpha=trial.suggest_float("smoothquant.alpha", 0.3, 0.8, step=0.1))

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        """Only with calibration data and a LayerNorm or attention block to fold into."""
        model = ctx.task.model
        return ctx.has_calibration() and any(isinstance(m, nn.LayerNorm) for m in model.modules())

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        if isinstance(record, SmoothQuantRecord):
            report.note(f"{record.technique}: smoothed {len(record.smoothed)} group(s); "
                        f"{len(record.skipped)} Linear(s) left as they were")
            if record.smoothed:
                report.table(["folded into", "layers", "alpha", "max scale"],
                             [[p, ", ".join(g["layers"]), g["alpha"], f"{g['max_scale']:.3g}"]
                              for p, g in record.smoothed.items()])


@dataclasses.dataclass
class SmoothQuantRecord(StepRecord):
    """Producer name -> {"layers": smoothed Linears, "alpha": chosen alpha, "max_scale": max s}."""

    smoothed: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Group:
    producer: str
    layers: list[str]


def smooth(model: nn.Module, config: SmoothQuant, task: Task | None) -> nn.Module:
    calib = list(getattr(task, "calib", None) or []) if task is not None else []
    if not calib:
        raise SlimkitError("SmoothQuant needs calibration data and the task has none",
                           "pass a task with calib batches (the activation ranges decide the scales)")
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in config.exclude]
    if not linears:
        raise SlimkitError("SmoothQuant found no Linear layer to smooth", "apply it to a model with nn.Linear layers")
    was_training = model.training
    model.eval()
    try:
        skipped, smoothed = _smooth_groups(model, modules, linears, config, calib)
    finally:
        model.train(was_training)
    add_record(model, SmoothQuantRecord(config.type_name, config.to_dict(), skipped=skipped, smoothed=smoothed))
    return model


def _smooth_groups(model: nn.Module, modules: dict[str, nn.Module], linears: list[str], config: SmoothQuant,
                   calib: list) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    stats = _observe(model, linears, calib)
    groups, skipped = _groups(model, modules, linears, stats)
    reference = _run(model, calib[0])
    smoothed: dict[str, dict[str, Any]] = {}
    for group in groups:
        alpha, scale = _choose(config.alpha, group, modules, stats)
        if scale is None:
            skipped.update({n: "no alpha lowers its int8 output error" for n in group.layers})
            continue
        saved = _fold(modules, group, scale)
        if not _same(reference, _run(model, calib[0])):
            _restore(saved)
            why = f"its input ({group.producer}) is also used elsewhere (e.g. a residual add): folding changes the output"
            skipped.update({n: why for n in group.layers})
            continue
        smoothed[group.producer] = {"layers": group.layers, "alpha": alpha, "max_scale": float(scale.max())}
    return skipped, smoothed


@dataclasses.dataclass
class _Stats:
    absmax: dict[str, Tensor] = dataclasses.field(default_factory=dict)   # name -> (C,) max|X_j|
    rows: dict[str, list[Tensor]] = dataclasses.field(default_factory=dict)  # name -> [(n, C)] input rows
    producer: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # linear -> leaf modules giving its input


def _key(t: Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), t.stride(), t.dtype


def _observe(model: nn.Module, linears: list[str], calib: list) -> _Stats:
    """One pass over the calibration set: per-channel max|X| and sample rows of every Linear's input;
    on the first batch, which leaf modules returned the exact tensor each Linear reads."""
    stats = _Stats()
    outputs: dict[tuple, list[str]] = {}
    keep: list[Tensor] = []  # holds first-batch outputs so their memory (and keys) is not reused
    first = [True]
    modules = dict(model.named_modules())
    widths = {modules[n].in_features for n in linears}  # only tensors some Linear could read
    handles = []

    def out_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if first[0] and isinstance(out, Tensor) and out.dim() and out.shape[-1] in widths:
                outputs.setdefault(_key(out), []).append(name)
                keep.append(out)
        return hook

    def in_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if x is None:
                return
            if first[0] and name not in stats.producer:
                stats.producer[name] = list(outputs.get(_key(x), []))
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # (N, C)
            amax = flat.abs().amax(dim=0)
            stats.absmax[name] = torch.maximum(stats.absmax[name], amax) if name in stats.absmax else amax
            rows = stats.rows.setdefault(name, [])
            have = sum(r.shape[0] for r in rows)
            if have < _SAMPLE_ROWS:
                rows.append(flat[: _SAMPLE_ROWS - have].clone())
        return hook

    for name, m in modules.items():
        if not list(m.children()) and name:
            handles.append(m.register_forward_hook(out_hook(name)))
    for name in linears:
        handles.append(modules[name].register_forward_pre_hook(in_hook(name)))
    try:
        for batch in calib:
            _run(model, batch)
            first[0] = False
            keep.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def _foldable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    norm = isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))
    weight = getattr(m, "weight", None)
    return norm and isinstance(weight, Tensor) and weight.dim() == 1


def _groups(model: nn.Module, modules: dict[str, nn.Module], linears: list[str],
            stats: _Stats) -> tuple[list[_Group], dict[str, str]]:
    """Linears grouped by the op they can fold into; the rest with the reason they cannot."""
    by_producer: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    unmatched = []
    for name in linears:
        if name not in stats.producer:
            skipped[name] = "not run on the calibration data"
            continue
        producers = stats.producer[name]
        fold = next((p for p in producers if _foldable(modules[p])), None)
        if fold is not None and _width(modules[fold]) == modules[name].in_features:
            by_producer.setdefault(fold, []).append(name)
        elif producers:
            skipped[name] = f"preceded by {type(modules[producers[0]]).__name__}, which cannot absorb a scale"
        else:
            unmatched.append(name)
    for o, v in _value_to_output(model, modules).items():  # v -> o inside attention
        if o in unmatched and modules[v].out_features == modules[o].in_features and v not in by_producer:
            by_producer[v] = [o]
            unmatched.remove(o)
    skipped.update({n: "its input is not a LayerNorm's or Linear's output (a residual add, reshape or function "
                       "comes between)" for n in unmatched})
    return [_Group(p, ls) for p, ls in by_producer.items()], skipped


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else int(m.weight.shape[0])


def _value_to_output(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Output projection name -> value projection name, for attention blocks found by ``attention_blocks``."""
    names = {id(m): n for n, m in modules.items()}
    pairs = {}
    for block in attention_blocks(model):
        v = names[id(block.qkv[2])]
        candidates = [f"{block.name}.{c}" for c in _OUT_PROJ_NAMES]
        parent = block.name.rsplit(".", 1)[0] if "." in block.name else ""
        prefix = f"{parent}." if parent else ""
        candidates += [f"{prefix}output.dense", f"{prefix}output"]  # HF BERT: attention.output.dense
        o = next((c for c in candidates if isinstance(modules.get(c), nn.Linear)), None)
        if o is not None:
            pairs[o] = v
    return pairs


def _choose(alpha: float | str, group: _Group, modules: dict[str, nn.Module],
            stats: _Stats) -> tuple[float, Tensor | None]:
    """The group's alpha and (C,) scale; scale None when "auto" finds no alpha better than none."""
    act = stats.absmax[group.layers[0]]  # every layer of a group reads the same tensor
    weights = [modules[n].weight.detach().float() for n in group.layers]  # each (out, C)
    wmax = torch.cat(weights).abs().amax(dim=0).to(act.device)  # (C,)
    if alpha != "auto":
        return float(alpha), _scale(act, wmax, float(alpha))
    x = torch.cat(stats.rows[group.layers[0]])  # (n, C)
    errors = {a: _int8_error(x, weights, _scale(act, wmax, a)) for a in ALPHA_GRID}
    best = min(errors, key=errors.__getitem__)
    if errors[best] >= _int8_error(x, weights, torch.ones_like(act)):
        return best, None
    return best, _scale(act, wmax, best)


def _scale(act: Tensor, wmax: Tensor, alpha: float) -> Tensor:
    s = act.clamp(min=1e-5).pow(alpha) / wmax.clamp(min=1e-5).pow(1 - alpha)  # (C,)
    return torch.where((act > 0) & (wmax > 0), s.clamp(min=1e-5), torch.ones_like(s))


def _int8_error(x: Tensor, weights: list[Tensor], s: Tensor) -> float:
    """Squared error of (per-tensor int8 X / s) @ (per-row int8 W * s)^T against the float product."""
    xs = x / s  # (n, C)
    xq = min((_fake_int8(xs, r) for r in _CLIPS), key=lambda q: float((q - xs).pow(2).sum()))  # as mse calibration
    total = 0.0
    for w in weights:
        ws = w.to(x.device) * s  # (out, C)
        wstep = ws.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127  # (out, 1)
        wq = (ws / wstep).round().clamp(-127, 127) * wstep
        total += float(((xq @ wq.T) - (x @ w.to(x.device).T)).pow(2).sum())
    return total


def _fake_int8(x: Tensor, clip: float) -> Tensor:
    """``x`` through a symmetric per-tensor int8 grid clipped at ``clip * max|x|``."""
    step = (x.abs().max() * clip).clamp(min=1e-12) / 127
    return (x / step).round().clamp(-127, 127) * step


def _fold(modules: dict[str, nn.Module], group: _Group, s: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Divide the producer's output channels by s and multiply the Linears' input columns by it;
    returns (parameter, old value) pairs to undo it."""
    producer = modules[group.producer]
    saved = []
    with torch.no_grad():
        params = [(p, "out") for p in (producer.weight, getattr(producer, "bias", None)) if isinstance(p, Tensor)]
        params += [(modules[n].weight, "in") for n in group.layers]
        for p, side in params:
            saved.append((p, p.detach().clone()))
            scale = s.to(device=p.device, dtype=torch.float32)
            if side == "out":
                view = scale.reshape(-1, *([1] * (p.dim() - 1)))  # (C, 1) for Linear rows, (C,) for norms
                p.copy_((p.float() / view).to(p.dtype))
            else:
                p.copy_((p.float() * scale).to(p.dtype))  # (out, C) * (C,)
    return saved


def _restore(saved: list[tuple[Tensor, Tensor]]) -> None:
    with torch.no_grad():
        for p, old in saved:
            p.copy_(old)


def _run(model: nn.Module, batch: Any) -> list[Tensor]:
    """The model's output tensors on one batch (HF output objects and tuples flattened)."""
    args = (batch,) if isinstance(batch, Tensor) else tuple(batch)
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.inference_mode():
        try:
            out = model(*(a.to(device) if isinstance(a, Tensor) else a for a in args))
        except Exception as err:  # noqa: BLE001 - torch errors from deep inside become one line
            first = (str(err).strip().splitlines() or [""])[0]
            raise SlimkitError(f"model failed on a calibration batch: {type(err).__name__}: {first}",
                               "check that each batch is a tuple of the model's positional inputs") from err
    return _tensors(out)


def _tensors(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out.detach().float()]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _same(ref: list[Tensor], new: list[Tensor]) -> bool:
    if len(ref) != len(new):
        return False
    for a, b in zip(ref, new):
        if a.shape != b.shape or (a - b).abs().max() > _FOLD_TOL * (1.0 + float(a.abs().max())):
            return False
    return True
