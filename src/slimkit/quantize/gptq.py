"""GPTQ for grouped int4 weights: round one input column at a time and push each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Round-to-nearest treats every weight alone; a Linear's output error is ``(W - Q) X`` though, and
inputs are correlated, so a rounding error in one column can be cancelled by nudging the others.
GPTQ (Frantar et al. 2023) does that with ``H = X^T X`` from calibration data. On all-MiniLM-L6-v2
at int4 g32 it lifts the mean cosine to the fp32 embeddings from 0.967 (round-to-nearest) to 0.982.

The result is slimkit's int4 format (``quantize.pack``): asymmetric per group of ``group_size``
inputs, ``w ≈ (q - zero) * scale`` with q in [0, 15], so every runtime that runs int4 runs it.
``act_order=True`` (the default; MiniLM int4 g128 cosine to fp32 0.9695 -> 0.9734, with AWQ's
scales 0.9742) visits the columns by decreasing ``H_jj`` (the inputs with the most
energy first, while the most columns remain to absorb their error) with *static groups*: every
group's scale and zero are fixed first from the weights in their natural order, so the stored groups
stay contiguous and the int4 format and kernels are unchanged. Natural order (``act_order=False``):
each group's scale and zero come from the group's weights *as updated so far*. The sweep itself is
``slimkit.calibrate.obs`` (shared with SparseGPT's N:M pruning).
"""

from __future__ import annotations

import torch

from slimkit.calibrate import obs
from slimkit.core.errors import SlimkitError
from slimkit.formats import pack

LEVELS = pack.INT4_LEVELS  # q in [0, 15]


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = 0.01,
              act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight and its inputs' (K, K) Hessian -> slimkit int4 ``(packed (N, K/2), scale, zero)``.

    ``damp`` (fraction of the mean diagonal added to it) keeps the Cholesky factorisation stable.
    ``act_order``: columns in order of decreasing ``H_jj`` (static groups, see the module doc).
    """
    n, k = weight.shape
    g = pack.check_int4_shape(k, group_size)
    if act_order:
        return _act_order(weight, hessian, g, damp)
    w, h_inv = obs.prepare(weight, hessian, damp)
    q = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    scale, lo = torch.zeros(n, k // g, device=w.device), torch.zeros(n, k // g, device=w.device)

    def round_column(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
        gi = col // g
        if col % g == 0:  # a new group (blocks hold whole groups): its range from the weights as updated so far
            grp = block[:, i:i + g]  # (N, g)
            lo[:, gi], hi = grp.amin(1), grp.amax(1)
            scale[:, gi] = pack.safe_scale(hi - lo[:, gi], LEVELS)
        qc = torch.round((block[:, i] - lo[:, gi]) / scale[:, gi]).clamp(0, LEVELS)  # (N,)
        q[:, col] = qc.to(torch.uint8)
        return qc * scale[:, gi] + lo[:, gi]

    obs.sweep(w, h_inv, round_column, block=max(obs.BLOCK, g))
    return pack.pack_int4(q), scale, -lo / scale


def _act_order(weight: torch.Tensor, hessian: torch.Tensor, g: int, damp: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ with columns visited by decreasing ``H_jj`` and each group's scale and zero fixed first from
    the weights in their natural order (static groups: the stored groups stay contiguous)."""
    n, k = weight.shape
    if hessian.shape != (k, k):  # before permuting, which would hide the mismatch
        raise SlimkitError(f"Hessian {tuple(hessian.shape)} does not fit a weight with K={k}",
                           "compute it from this layer's inputs")
    perm = torch.argsort(torch.diag(hessian), descending=True)  # (K,) visiting order
    w, h_inv = obs.prepare(weight[:, perm], hessian[perm][:, perm], damp)  # permuted (N, K), (K, K)
    natural = torch.empty_like(w)
    natural[:, perm] = w  # (N, K) back in input order (dead inputs zeroed by prepare)
    grp = natural.reshape(n, k // g, g)
    lo = grp.amin(-1)  # (N, G)
    scale = pack.safe_scale(grp.amax(-1) - lo, LEVELS)  # (N, G)
    group_of = (perm // g).to(w.device)  # (K,) group of each visited column
    q = torch.zeros(n, k, dtype=torch.uint8, device=w.device)

    def round_column(block: torch.Tensor, i: int, col: int) -> torch.Tensor:
        gi = int(group_of[col])
        qc = torch.round((block[:, i] - lo[:, gi]) / scale[:, gi]).clamp(0, LEVELS)  # (N,)
        q[:, int(perm[col])] = qc.to(torch.uint8)
        return qc * scale[:, gi] + lo[:, gi]

    obs.sweep(w, h_inv, round_column)
    return pack.pack_int4(q), scale, -lo / scale


__all__ = ["gptq_int4"]
