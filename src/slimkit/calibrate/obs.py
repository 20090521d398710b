"""Optimal Brain Surgeon's column sweep, shared by GPTQ (rounding) and SparseGPT (N:M pruning).

Both change a Linear's weight one input column at a time and push each column's change onto the
columns not yet visited, weighted by the inverse Hessian of the layer's inputs ``H = X^T X``, so the
layer's output on calibration data moves as little as possible. Only what a column becomes differs:
its rounded values (GPTQ) or the same values with the pruned ones set to zero (SparseGPT). This module
holds the common part: the inputs' Hessians from one calibration pass, the damped inverse Cholesky
factor, and the blocked sweep with the paper's lazy batch updates.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import each
from slimkit.core.task import Task

BLOCK = 128  # columns updated together before the lazy update of the rest (the papers' batching)
#: ``column(block, i, col) -> new column``: ``block`` (N, B) holds the block's weights as updated so far,
#: ``i`` the column's index in it and ``col`` in the whole weight; returns the (N,) values to keep.
Column = Callable[[torch.Tensor, int, int], torch.Tensor]


def unsupported(layer: nn.Module) -> str | None:
    """Why the sweep cannot treat ``layer`` as a GEMM over its inputs, or None when it can."""
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return "grouped/depthwise conv (its weight is not one GEMM over the unfolded input)"
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return f"conv padding {layer.padding!r}/{layer.padding_mode} (unfold needs explicit zero padding)"
        return None
    return f"{type(layer).__name__} is neither Linear nor Conv2d"


def gemm_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows the layer's weight (N, K) multiplies: (rows, K). A Conv2d's are its unfolded input
    patches, in the order of ``weight.reshape(out, in * kh * kw)``."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                        stride=layer.stride)  # (B, C*kh*kw, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def hessian_hooks(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Accumulate ``X^T X`` of each named module's input while the ``with`` body runs forwards; on
    exit the yielded dict holds ``X^T X / rows`` (K, K) float32 per module that saw data. Hooking
    only some modules (one block's) bounds the memory the statistics take."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def observe(module: nn.Module, args: tuple) -> None:
            x = gemm_rows(module, args[0].detach()).double()  # (rows, K)
            if name in sums:
                sums[name].addmm_(x.T, x)
            else:
                sums[name] = x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return observe

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    out: dict[str, torch.Tensor] = {}
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
    for n in list(sums):
        out[n] = (sums.pop(n) / rows[n]).float()  # the float64 sum freed as each result is made


def input_hessians(model: nn.Module, names: list[str], batches: Iterable[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
    """``X^T X / rows`` (K, K) float32 of each named Linear's (or Conv2d's unfolded) input over all
    calibration batches."""
    modules = dict(model.named_modules())
    was_training = model.training
    try:
        model.eval()
        device = next(iter(model.parameters()), torch.empty(0)).device
        with hessian_hooks({n: modules[n] for n in names}) as hessians, torch.inference_mode():
            for batch in each(batches, f"calibrating {len(names)} layers (input Hessians)"):
                model(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch))
    finally:
        model.train(was_training)
    check_reached(names, hessians)
    return {n: hessians[n] for n in names}


def check_reached(names: Iterable[str], stats: dict[str, Any]) -> None:
    """One-line error naming the first layer no calibration batch reached."""
    unseen = [n for n in names if n not in stats]
    if unseen:
        raise SlimkitError(f"calibration never reached {unseen[0]!r}",
                           "give calibration batches that run through every layer being compressed")


def task_batches(task: Task, method: str, instead: str) -> list[Any]:
    """The task's calibration batches, for ``method``; a one-line error naming ``instead`` (the
    uncalibrated alternative) when the task has none."""
    calib = getattr(task, "calib", None) if task is not None else None
    if not calib:
        raise SlimkitError(f"method={method!r} needs calibration data and the task has none",
                           f"pass a task with calib batches, or use method={instead!r}")
    return list(calib)


def task_hessians(model: nn.Module, names: list[str], task: Task, method: str, instead: str) -> dict[str, torch.Tensor]:
    """``input_hessians`` over the task's calibration batches, for ``method`` (see ``task_batches``)."""
    calib = task_batches(task, method, instead)
    return input_hessians(model, names, calib) if names else {}


def prepare(weight: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 copy of ``weight`` (N, K) and the upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1``.

    Inputs that were always zero get unit curvature and zero weights (on the calibration data they
    never matter; the reference implementations do the same). ``damp`` keeps the factorisation
    stable when inputs are nearly collinear.
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise SlimkitError(f"Hessian {tuple(hessian.shape)} does not fit a weight with K={k}",
                           "compute it from this layer's inputs")
    w = weight.detach().float().clone()  # on the weight's device; the Hessian joins it there
    # min/max carry any NaN or Inf; isfinite(w) would hold a temporary twice w's size (0.5 GB for a 1B lm_head)
    if not all(torch.isfinite(v).all() for t in (w, hessian) for v in torch.aminmax(t)):
        raise SlimkitError("weight or calibration statistics contain NaN or Inf",
                           "fix the model or the calibration data before compressing")
    h = hessian.detach().to(w.device, torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, device=h.device)
    return w, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def sweep(w: torch.Tensor, h_inv: torch.Tensor, column: Column, block: int = BLOCK) -> torch.Tensor:
    """Visit the columns of ``w`` (N, K, changed in place and returned) left to right, replacing each
    by ``column(...)`` and spreading its change over the columns to its right."""
    k = w.shape[1]
    for start in range(0, k, block):
        end = min(start + block, k)
        part = w[:, start:end].clone()  # (N, B)
        errors = torch.zeros_like(part)
        hb = h_inv[start:end, start:end]  # (B, B)
        for i in range(end - start):
            new = column(part, i, start + i)  # (N,)
            err = (part[:, i] - new) / hb[i, i]
            part[:, i:] -= err[:, None] * hb[i, i:][None, :]
            part[:, i] = new
            errors[:, i] = err
        w[:, start:end] = part
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return w
