"""Least-squares reconstruction after channel pruning: refit the layers that lost input channels.

Removing channels throws away what they fed the next layer; one-shot pruning at a low MACs ratio
leaves a model that classifies barely above chance, and fine-tuning must first undo that damage
(ThiNet, Luo et al. 2017; channel pruning with reconstruction, He et al. 2017). Here every
Conv1d / Conv2d / Linear whose inputs were pruned is refitted, in execution order, so that on calibration
inputs its output (the channels it kept) matches the unpruned layer's output as closely as a
ridge least-squares fit allows: ``min ||P W - Y||^2 + lam ||W - W0||^2``, with ``P`` the pruned
model's inputs to the layer (im2col patches for a conv), ``Y`` the original layer's outputs and
``W0`` the weights pruning left (the shrinkage target, so few samples cannot run away).
Layers are done one after the other on the already refitted model, so each also absorbs the
error the layers before it left. No gradient steps: one forward pass per refitted layer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_bar
from slimkit.graph.dependency import execution_order

log = logging.getLogger("slimkit.prune")

DEFAULT_RIDGE = 1e-2  # with a single calibration batch there is nothing to hold out
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # relative shrinkages tried when none is given
_CHUNK = 1 << 23  # patch-matrix elements formed at once (64 MiB of float64): big convs go in slices
#: Rows (samples x output positions) a layer's fit may use, per weight-matrix row: the Gram matrix
#: costs rows * d^2, so a conv with thousands of inputs per output over long inputs is subsampled
#: (uniformly, seeded) to a few times as many rows as it has unknowns, which bounds its time.
ROWS_PER_UNKNOWN = 4
MIN_ROWS = 8192
SINGLE_PRECISION_FROM = 1024  # unknowns per output from which the Gram matrix is formed in float32


@dataclasses.dataclass
class LayerFit:
    """Relative output error of one refitted layer on the calibration inputs, before and after."""

    before: float
    after: float
    ridge: float  # the shrinkage used, relative to the mean diagonal of the layer's Gram matrix


class _Captured(Exception):
    """Raised by a hook once the wanted tensor is captured: the rest of the forward is not needed."""


def reconstruct(original: nn.Module, pruned: nn.Module, kept_out: dict[str, list[int]],
                inputs: Iterable[tuple[torch.Tensor, ...]], ridge: float | None = None,
                progress: bool = False) -> tuple[dict[str, LayerFit], dict[str, str]]:
    """Refit ``pruned``'s input-pruned Conv1d/Conv2d/Linear layers in place: (fits, layers left as they were with why).

    ``kept_out[name]``: the original indices of the output channels layer ``name`` kept (layers
    missing from it kept all). ``inputs``: calibration input tuples. ``ridge``: shrinkage towards
    the pruned weights, relative to the mean diagonal of the layer's Gram matrix; by default each
    layer takes the one of ``RIDGES`` that best predicts one half of the calibration batches
    from the other (two-fold), so a Linear with nearly as many inputs as samples is not overfitted.
    """
    batches = [tuple(b) for b in inputs]
    if not batches:
        raise SlimkitError("reconstruction needs calibration inputs and got none",
                           "give the task calib batches, or set reconstruct=False")
    if ridge is not None and ridge <= 0:
        raise SlimkitError(f"reconstruction ridge={ridge} must be positive", "use e.g. 1e-2")
    before = dict(original.named_modules())
    todo, fits, skipped = [], {}, {}
    for name in execution_order(pruned, batches[0]):
        layer, ref = pruned.get_submodule(name), before.get(name)
        if ref is None or type(ref) is not type(layer) or _in_width(layer) == _in_width(ref):
            continue
        reason = _unsupported(layer)
        if reason:
            skipped[name] = f"not refitted: {reason}"
            log.info("prune: %s not refitted: %s", name, reason)
        else:
            todo.append(name)
    original.eval(), pruned.eval()
    with progress_bar(progress) as bar:
        task_id = bar.add_task("reconstruct", total=len(todo), info="") if bar is not None else None
        for name in todo:
            fits[name] = _refit(original, pruned, name, kept_out.get(name), batches, ridge)
            if bar is not None:
                bar.advance(task_id)
    return fits, skipped


@dataclasses.dataclass
class _Stats:
    """Sufficient statistics of ``||P W - T||^2``: ``P^T P``, ``P^T T`` and ``||T||^2``."""

    gram: torch.Tensor   # (d, d) float64
    cross: torch.Tensor  # (d, out) float64
    target_sq: float = 0.0

    def residual(self, w: torch.Tensor) -> float:
        return float((w * (self.gram @ w)).sum() - 2 * (w * self.cross).sum()) + self.target_sq

    def __add__(self, other: "_Stats") -> "_Stats":
        return _Stats(self.gram + other.gram, self.cross + other.cross, self.target_sq + other.target_sq)


def _refit(original: nn.Module, pruned: nn.Module, name: str, kept: list[int] | None,
           batches: list[tuple], ridge: float | None) -> LayerFit:
    layer, ref = pruned.get_submodule(name), original.get_submodule(name)
    w0 = _as_matrix(layer)  # (d, out): d = in * kh * kw (+1 for the bias)
    halves = [_Stats(w0.new_zeros(w0.shape[0], w0.shape[0]), torch.zeros_like(w0)) for _ in range(2)]
    row_cap = max(MIN_ROWS, ROWS_PER_UNKNOWN * w0.shape[0])
    generator = torch.Generator().manual_seed(0)
    for i, batch in enumerate(batches):
        x = _capture(pruned, layer, batch)
        y = _capture(original, ref, batch, output=True)
        conv = isinstance(layer, nn.modules.conv._ConvNd)
        outputs = y.shape[1] if conv else y.shape[-1]
        positions = y[0].numel() // outputs       # rows one sample gives
        step = max(1, _CHUNK // (positions * w0.shape[0]))  # samples per slice
        keep = min(1.0, row_cap / (positions * y.shape[0] * len(batches)))  # share of rows used
        half = halves[i % 2]
        for xs, ys in zip(x.split(step), y.split(step)):
            p = _patches(layer, xs)               # (rows, d)
            t = _rows(layer, ys)                  # (rows, out_original)
            if kept is not None:
                t = t[:, kept]                    # (rows, out)
            if keep < 1.0:
                chosen = torch.rand(p.shape[0], generator=generator) < keep
                p, t = p[chosen], t[chosen]       # (~rows * keep, d), (~rows * keep, out)
            if p.shape[1] > SINGLE_PRECISION_FROM:  # big Gram products in float32 (half the time), summed in float64
                single = p.float()
                half.gram += (single.T @ single).double()
            else:
                half.gram += p.T @ p
            half.cross += p.T @ t
            half.target_sq += float((t * t).sum())
    total = halves[0] + halves[1]
    scale = float(total.gram.diagonal().mean())
    if ridge is None and len(batches) < 2:
        ridge = DEFAULT_RIDGE
    elif ridge is None:  # the shrinkage that predicts held-out outputs best: fit on one half, score the other
        folds = ((halves[0], halves[1]), (halves[1], halves[0]))
        ridge = min(RIDGES, key=lambda r: sum(b.residual(_solve(a, w0, r * float(a.gram.diagonal().mean()),
                                                                 torch.float32)) for a, b in folds))
    w = _solve(total, w0, ridge * scale)
    norm = max(total.target_sq, 1e-30)
    fit = LayerFit(before=(max(total.residual(w0), 0.0) / norm) ** 0.5,
                   after=(max(total.residual(w), 0.0) / norm) ** 0.5, ridge=ridge)
    if not torch.isfinite(w).all() or fit.after > fit.before:
        log.info("prune: %s kept its pruned weights (refit error %.3g >= %.3g)", name, fit.after, fit.before)
        return LayerFit(fit.before, fit.before, ridge)
    _write(layer, w)
    return fit


def _solve(stats: _Stats, w0: torch.Tensor, lam: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """argmin ||P W - T||^2 + lam ||W - W0||^2 = (P^T P + lam I)^-1 (P^T T + lam W0).

    ``dtype=float32`` for trial solves when choosing the ridge: an imprecise solution only scores
    worse on the held-out half, so it cannot be chosen wrongly; the kept solve is float64."""
    system = stats.gram.to(dtype, copy=True)  # the stats are read again after this solve
    system.diagonal().add_(lam)
    rhs = (stats.cross + lam * w0).to(dtype)
    if dtype == torch.float64:
        return torch.linalg.solve(system, rhs)
    factor, info = torch.linalg.cholesky_ex(system)  # trials: Cholesky, half the work of LU
    solution = torch.linalg.solve(system, rhs) if int(info) != 0 else torch.cholesky_solve(rhs, factor)
    return solution.double()


def _capture(model: nn.Module, layer: nn.Module, batch: tuple, output: bool = False) -> torch.Tensor:
    """The first input (or the output) of ``layer`` when ``model`` runs on ``batch``."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, out: Any = None) -> None:
        seen.append((out if output else args[0]).detach())
        raise _Captured

    handle = layer.register_forward_hook(hook) if output else layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*batch)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise SlimkitError("a pruned layer did not run on the calibration inputs",
                           "check that the calibration batches exercise the whole model")
    return seen[0]


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows the layer multiplies by its weight matrix, plus a ones column for the bias."""
    if isinstance(layer, nn.Conv1d):  # unfolded as a (k, 1) Conv2d: (B, in, L) -> (B, in, L, 1)
        cols = F.unfold(x.unsqueeze(-1), (layer.kernel_size[0], 1), dilation=(layer.dilation[0], 1),
                        padding=(layer.padding[0], 0), stride=(layer.stride[0], 1))  # (B, in * k, L')
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    elif isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)      # (B, in * kh * kw, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        rows = x.reshape(-1, x.shape[-1])         # (tokens, in)
    rows = rows.double()
    if layer.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def _rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv1d):
        return y.transpose(1, 2).reshape(-1, y.shape[1]).double()  # (B * L, out)
    if isinstance(layer, nn.Conv2d):
        return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]).double()  # (B * H * W, out)
    return y.reshape(-1, y.shape[-1]).double()


def _as_matrix(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1).T.double()  # (in * kh * kw, out)
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().double()[None]], dim=0)
    return w


def _write(layer: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        d = layer.weight[0].numel()
        layer.weight.copy_(w[:d].T.reshape(layer.weight.shape).to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(w[d].to(layer.bias.dtype))


def _in_width(layer: nn.Module) -> int | None:
    """Input width of a Conv/Linear (None for the layers reconstruction does not refit)."""
    return getattr(layer, "in_channels", getattr(layer, "in_features", None))


def _unsupported(layer: nn.Module) -> str:
    if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return f"{type(layer).__name__} is not unfolded here (Conv1d, Conv2d and Linear are)"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            return "grouped/depthwise conv (each output sees only its own inputs: nothing to refit)"
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"padding {layer.padding!r} / {layer.padding_mode} is not unfolded here"
    if layer.weight.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        return f"weights of dtype {layer.weight.dtype}"
    return ""
