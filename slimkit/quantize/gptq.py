"""GPTQ for grouped int4 weights: round one input column at a time and push each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Round-to-nearest treats every weight alone; a Linear's output error is ``(W - Q) X`` though, and
inputs are correlated, so a rounding error in one column can be cancelled by nudging the others.
GPTQ (Frantar et al. 2023) does that with ``H = X^T X`` from calibration data. On all-MiniLM-L6-v2
at int4 g32 it lifts the mean cosine to the fp32 embeddings from 0.967 (round-to-nearest) to 0.982.

The result is slimkit's int4 format (``quantize.pack``): asymmetric per group of ``group_size``
inputs, ``w ≈ (q - zero) * scale`` with q in [0, 15], so every runtime that runs int4 runs it.
Each group's scale and zero come from the group's weights *as updated so far*, as in the paper's
reference implementation; columns are taken in their natural order (no act-order), which keeps
groups contiguous for the kernels.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn

from slimkit.errors import SlimkitError
from slimkit.quantize import pack

LEVELS = pack.INT4_LEVELS  # q in [0, 15]
BLOCK = 128  # columns updated together before the lazy update of the rest (the paper's batching)


def input_hessians(model: nn.Module, names: list[str], batches: Iterable[tuple[Any, ...]]) -> dict[str, torch.Tensor]:
    """``X^T X / rows`` (K, K) float32 of each named Linear's input over all calibration batches."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def observe(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (rows, K)
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return observe

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in names]
    was_training = model.training
    try:
        model.eval()
        device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            for batch in batches:
                model(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unseen = [n for n in names if n not in sums]
    if unseen:
        raise SlimkitError(f"GPTQ: calibration never reached {unseen[0]!r}",
                           "give calibration batches that run through every quantized layer")
    return {n: (sums[n] / rows[n]).float() for n in names}


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight and its inputs' (K, K) Hessian -> slimkit int4 ``(packed (N, K/2), scale, zero)``.

    ``damp`` (fraction of the mean diagonal added to it) keeps the Cholesky factorisation stable.
    """
    n, k = weight.shape
    g = pack.check_int4_shape(k, group_size)
    if hessian.shape != (k, k):
        raise SlimkitError(f"GPTQ: Hessian {tuple(hessian.shape)} does not fit a weight with K={k}",
                           "compute it from this layer's inputs")
    w = weight.detach().float().clone()  # (N, K), updated in place as columns are rounded
    if not torch.isfinite(w).all() or not torch.isfinite(hessian).all():
        raise SlimkitError("GPTQ: weight or calibration statistics contain NaN or Inf",
                           "fix the model or the calibration data before quantizing")
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (K, K) upper

    q = torch.zeros(n, k, dtype=torch.uint8)
    scale = torch.zeros(n, k // g)
    lo = torch.zeros(n, k // g)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        block = w[:, start:end].clone()  # (N, B)
        errors = torch.zeros_like(block)
        hb = h_inv[start:end, start:end]  # (B, B)
        for i in range(end - start):
            col = start + i
            if col % g == 0:  # a new group: its range from the weights as updated so far
                grp = torch.cat([block[:, i:], w[:, end:col + g]], dim=1)[:, :g]  # (N, g)
                gi = col // g
                lo[:, gi], hi = grp.amin(1), grp.amax(1)
                scale[:, gi] = pack.safe_scale(hi - lo[:, gi], LEVELS)
            s, low = scale[:, col // g], lo[:, col // g]
            qc = torch.round((block[:, i] - low) / s).clamp(0, LEVELS)  # (N,)
            q[:, col] = qc.to(torch.uint8)
            err = (block[:, i] - (qc * s + low)) / hb[i, i]
            block[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return pack.pack_int4(q), scale, -lo / scale
