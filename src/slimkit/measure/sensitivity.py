"""Per-layer sensitivity: how much the task loses when *only one* layer is compressed.

Mixed precision, accuracy control and the optimizer's first trials all need the same ranking:
which layers can take 4 bits (or losing half their weights) and which cannot. Two estimates:

- :func:`layer_sensitivity` measures it: each layer in turn gets the weights it would really
  have after quantization (the deployed int8 / grouped int4 integers, dequantized) or after
  magnitude pruning, the task is scored, and the weights are put back. ``measure="metric"`` uses
  the task's own metric (exact but coarse: one test image is 0.1 pt on mnist);
  ``measure="output"`` uses the output noise ``|y - y_fp32|^2 / |y_fp32|^2`` on a few calibration
  batches (fine-grained and roughly additive over layers, which mixed precision's integer program
  assumes; cheap on a transformer).
- :func:`hessian_trace` estimates the trace of each layer's loss Hessian with Hutchinson's
  method (``E[v^T H v]`` over Rademacher ``v``): no per-layer re-evaluation, one backward of a
  backward per sample. A big trace means a sharp loss in that layer's weights (HAWQ).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.markup import escape
from rich.table import Table

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_bar
from slimkit.core.task import Task, split_item
from slimkit.formats import pack

KINDS = ("quantize", "prune")
MEASURES = ("metric", "output")
#: Group size of the int4 weights the ranking simulates (WeightOnly's usual choice).
INT4_GROUP = 32


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers (subclasses included), in module order."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, nn.Conv2d))]


@torch.no_grad()
def compressed_weight(w: torch.Tensor, kind: str, bits: int = 8, ratio: float = 0.5,
                      group_size: int = INT4_GROUP) -> torch.Tensor:
    """The float weight a layer would have after ``kind``: the deployed integers dequantized.

    bits 8: symmetric per-channel int8 (``pack.quantize_weight_int8``); bits 4 on a 2-D weight whose
    input size the group divides: grouped asymmetric int4 (``pack.quantize_weight_int4``, ``group_size``
    inputs per scale/zero, 0: one per row);
    16: a float16 round trip; other bits: symmetric per-channel at that width. ``prune`` zeroes
    the ``ratio`` smallest-magnitude weights.
    """
    if kind == "prune":
        k = int(round(ratio * w.numel()))
        if k <= 0:
            return w.clone()
        cut = w.abs().flatten().kthvalue(k).values
        return torch.where(w.abs() <= cut, torch.zeros_like(w), w)
    if bits >= 16:
        return w.half().to(w.dtype)
    if bits == 8:
        return pack.dequantize_int8(*pack.quantize_weight_int8(w, True)).to(w.dtype)
    if bits == 4 and w.ndim == 2 and w.shape[1] % (group_size or w.shape[1]) == 0:
        return pack.dequantize_int4(*pack.quantize_weight_int4(w, group_size)).to(w.dtype)
    levels = 2 ** (bits - 1) - 1
    scale = (w.abs().flatten(1).amax(1) / levels).clamp_min(1e-12).reshape(-1, *([1] * (w.ndim - 1)))
    return (torch.round(w / scale).clamp(-levels, levels) * scale).to(w.dtype)


def _check(model: nn.Module, kind: str, bits: int, ratio: float, measure: str,
           layers: Sequence[str] | None, group_size: int = INT4_GROUP) -> list[str]:
    if kind not in KINDS:
        raise SlimkitError(f"sensitivity kind={kind!r} is not known", f"use one of {', '.join(KINDS)}")
    if measure not in MEASURES:
        raise SlimkitError(f"sensitivity measure={measure!r} is not known", f"use one of {', '.join(MEASURES)}")
    if kind == "quantize" and not 2 <= bits <= 16:
        raise SlimkitError(f"bits={bits} is outside 2..16", "use 4, 8 or 16")
    if group_size < 0 or group_size % 2:
        raise SlimkitError(f"group_size={group_size} is not an even size >= 0", "use e.g. 32 or 128 (0: one per row)")
    if kind == "prune" and not 0.0 < ratio < 1.0:
        raise SlimkitError(f"prune ratio={ratio} is outside (0, 1)", "use e.g. 0.5")
    names = weight_layers(model) if layers is None else list(layers)
    modules = dict(model.named_modules())
    for n in names:
        if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d)):
            raise SlimkitError(f"{n!r} is not a Linear or Conv2d layer of the model",
                               "pass names from slimkit.measure.sensitivity.weight_layers(model)")
    if not names:
        raise SlimkitError("the model has no Linear or Conv2d layer to rank", "pass a model with weight layers")
    return names


def _flat(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float()
    if hasattr(output, "logits"):
        return output.logits.float()
    if isinstance(output, (tuple, list)) and output:
        return _flat(output[0])
    raise SlimkitError(f"cannot compare outputs of type {type(output).__name__}", "return a tensor from forward")


def _output_scorer(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> Callable[[], float]:
    """A function giving the output noise-to-signal ratio against the outputs right now."""
    def run() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [_flat(model(*b)) for b in batches]

    reference = run()
    power = sum(float(r.pow(2).sum()) for r in reference)

    def noise() -> float:
        return sum(float((y - r).pow(2).sum()) for y, r in zip(run(), reference)) / max(power, 1e-30)

    return noise


def layer_sensitivity(model: nn.Module, task: Task, kind: str = "quantize", bits: int = 8, ratio: float = 0.5,
                      layers: Sequence[str] | None = None, *, measure: str = "metric",
                      batches: Sequence[tuple[torch.Tensor, ...]] | None = None,
                      progress: bool = False, group_size: int = INT4_GROUP) -> dict[str, float]:
    """``{layer: drop}`` when only that layer is quantized to ``bits`` (or pruned by ``ratio``).

    4 bits on a Linear weight: grouped int4 with ``group_size`` inputs per scale/zero (0: one per row),
    so mixed precision can rank the same layer at several group sizes.

    ``measure="metric"``: drop of the task metric (``task.drop``: positive = worse);
    ``"output"``: output noise-to-signal ratio on ``batches`` (default: the first 4 calibration
    batches). The model is restored exactly (weights and train/eval mode) even on error.
    """
    names = _check(model, kind, bits, ratio, measure, layers, group_size)
    was_training = model.training
    model.eval()
    if measure == "metric":
        if task is None:
            raise SlimkitError("metric sensitivity needs a task", "pass the task, or measure='output' with batches=")
        base = task.evaluate(model)["score"]

        def score() -> float:
            return float(task.drop(base, task.evaluate(model)["score"]))
    else:
        data = list(batches) if batches is not None else list(getattr(task, "calib", None) or [])[:4]
        if not data:
            raise SlimkitError("output sensitivity needs input batches and the task has no calibration data",
                               "pass batches=[(inputs,), ...]")
        data = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
        score = _output_scorer(model, data)
    try:
        scores = scored_variants(model, score, names,
                                 lambda name, layer: [(None, compressed_weight(layer.weight.detach(), kind, bits,
                                                                               ratio, group_size))],
                                 label=f"sensitivity ({kind})", progress=progress)
    finally:
        model.train(was_training)
    return {name: by_key[None] for name, by_key in scores.items()}


#: ``variants(name, layer) -> [(key, weight), ...]``: the weights a layer is tried with, one at a time.
Variants = Callable[[str, nn.Module], Iterable[tuple[Hashable, torch.Tensor]]]


def scored_variants(model: nn.Module, score: Callable[[], float], names: Sequence[str], variants: Variants, *,
                    label: str = "sensitivity", progress: bool = False) -> dict[str, dict[Hashable, float]]:
    """``{layer: {key: score()}}`` with only that layer's weight replaced by each variant in turn.

    The one loop behind every per-layer sensitivity in slimkit (quantization widths, pruning
    ratios, factorization ranks): the weight is put back exactly after each variant, even on error.
    """
    out: dict[str, dict[Hashable, float]] = {}
    with progress_bar(progress) as bar:
        bar_id = bar.add_task(label, total=len(names), info="") if bar else None
        for name in names:
            layer = model.get_submodule(name)
            saved = layer.weight.detach().clone()
            out[name] = {}
            try:
                for key, weight in variants(name, layer):
                    with torch.no_grad():
                        layer.weight.copy_(weight.reshape(saved.shape))
                    out[name][key] = score()
            finally:
                with torch.no_grad():
                    layer.weight.copy_(saved)
            if bar:
                bar.update(bar_id, advance=1, info=name)
    return out


def scored_swaps(model: nn.Module, score: Callable[[], float], swaps: Mapping[str, nn.Module], *,
                 label: str = "sensitivity", progress: bool = False) -> dict[str, float]:
    """``{name: score()}`` with only that submodule replaced by ``swaps[name]`` (e.g. a quantized layer
    back to float): the module-level twin of :func:`scored_variants`, restored after each swap."""
    out: dict[str, float] = {}
    with progress_bar(progress) as bar:
        bar_id = bar.add_task(label, total=len(swaps), info="") if bar else None
        for name, replacement in swaps.items():
            current = model.get_submodule(name)
            set_submodule(model, name, replacement)
            try:
                out[name] = score()
            finally:
                set_submodule(model, name, current)
            if bar:
                bar.update(bar_id, advance=1, info=name)
    return out


def output_scorer(model: nn.Module, batches: Sequence[tuple[torch.Tensor, ...]]) -> Callable[[], float]:
    """A function giving the output noise-to-signal ratio ``|y - y_ref|^2 / |y_ref|^2`` on ``batches``
    against the outputs the model gives right now (label-free: logits and embeddings alike)."""
    return _output_scorer(model, batches)


def _default_loss(model: nn.Module, task: Task) -> Callable[[tuple, Any], torch.Tensor]:
    """The task's loss on labelled batches; otherwise the output MSE to the model's own outputs
    (its Hessian is the Gauss-Newton matrix ``2 J^T J``, what unlabelled distillation sees)."""
    if getattr(task, "loss", None) is not None:
        return lambda inputs, labels: task.loss(model(*inputs), labels)

    def self_mse(inputs: tuple, labels: Any) -> torch.Tensor:
        y = _flat(model(*inputs))
        return F.mse_loss(y, y.detach())

    return self_mse


def hessian_trace(model: nn.Module, task: Task, *, layers: Sequence[str] | None = None, samples: int = 8,
                  batches: int = 2, seed: int = 0,
                  loss: Callable[[tuple, Any], torch.Tensor] | None = None) -> dict[str, float]:
    """Hutchinson estimate of ``tr(H)`` of the loss w.r.t. each layer's weight: ``E[v^T H v]``.

    Averaged over ``samples`` Rademacher vectors and the first ``batches`` training batches
    (calibration batches when the task has no training data). Costs ``samples * batches``
    double-backward passes in all, whatever the number of layers.
    """

    names = _check(model, "quantize", 8, 0.5, "metric", layers)
    if samples < 1 or batches < 1:
        raise SlimkitError(f"hessian_trace: samples={samples}, batches={batches}", "use at least 1 of each")
    data = list(getattr(task, "train", None) or getattr(task, "calib", None) or [])[:batches]
    if not data:
        raise SlimkitError("hessian_trace needs training or calibration batches", "give the task train= or calib=")
    loss_fn = loss or _default_loss(model, task)
    weights = [model.get_submodule(n).weight for n in names]
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(names)
    was_training = model.training
    model.eval()  # BatchNorm with running statistics: the function that is deployed
    try:
        for item in data:
            inputs, labels = split_item(item)
            value = loss_fn(inputs, labels)
            grads = torch.autograd.grad(value, weights, create_graph=True)
            for s in range(samples):
                vs = [(torch.randint(0, 2, w.shape, generator=gen) * 2 - 1).to(w) for w in weights]  # Rademacher
                hv = torch.autograd.grad(grads, weights, grad_outputs=vs, retain_graph=s < samples - 1)
                for i, (h, v) in enumerate(zip(hv, vs)):
                    totals[i] += float((h * v).sum())
    finally:
        model.train(was_training)
    n = samples * len(data)
    return {name: t / n for name, t in zip(names, totals)}


def ranked(sensitivity: Mapping[str, float]) -> list[tuple[str, float]]:
    """Layers from most to least sensitive."""
    return sorted(sensitivity.items(), key=lambda kv: (-kv[1] if math.isfinite(kv[1]) else -math.inf))


def render_sensitivity(sensitivity: Mapping[str, float], title: str = "layer sensitivity", top: int = 20) -> Any:
    """A rich table of the ``top`` most sensitive layers."""
    table = Table(title=title, title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("drop", justify="right")
    for name, value in ranked(sensitivity)[:top]:
        table.add_row(escape(name), f"{value:.4g}")
    return table


def report_sensitivity(report: Any, sensitivity: Mapping[str, float], title: str = "Layer sensitivity",
                       unit: str = "metric drop when only this layer is compressed", top: int = 30) -> None:
    """Add a table and a bar plot of the ``top`` most sensitive layers to a ``slimkit.report.Report``."""
    rows = ranked(sensitivity)[:top]
    report.heading(title)
    report.table(["layer", unit], [[n, v] for n, v in rows])
    report.bar_plot(title, [n for n, _ in rows], {unit: [v for _, v in rows]}, unit)
    report.data.setdefault("sensitivity", {})[title] = dict(sensitivity)


__all__ = ["compressed_weight", "hessian_trace", "layer_sensitivity", "output_scorer", "ranked", "render_sensitivity",
           "report_sensitivity", "scored_swaps", "scored_variants", "weight_layers"]
