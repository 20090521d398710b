"""GPTQ for grouped int4 weights: round one input column at a time and push each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

Round-to-nearest treats every weight alone; a Linear's output error is ``(W - Q) X`` though, and
inputs are correlated, so a rounding error in one column can be cancelled by nudging the others.
GPTQ (Frantar et al. 2023) does that with ``H = X^T X`` from calibration data. On all-MiniLM-L6-v2
at int4 g32 it lifts the mean cosine to the fp32 embeddings from 0.967 (round-to-nearest) to 0.982.

The result is slimkit's int4 format (``quantize.pack``): asymmetric per group of ``group_size``
inputs, ``w ≈ (q - zero) * scale`` with q in [0, 15], so every runtime that runs int4 runs it.
Each group's scale and zero come from the group's weights *as updated so far*; columns are taken in
their natural order (no act-order), which keeps groups contiguous for the kernels. The sweep itself
is ``slimkit.calibrate.obs`` (shared with SparseGPT's N:M pruning).
"""

from __future__ import annotations

import torch

from slimkit.calibrate import obs
from slimkit.formats import pack

LEVELS = pack.INT4_LEVELS  # q in [0, 15]


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, *, damp: float = 0.01
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight and its inputs' (K, K) Hessian -> slimkit int4 ``(packed (N, K/2), scale, zero)``.

    ``damp`` (fraction of the mean diagonal added to it) keeps the Cholesky factorisation stable.
    """
    n, k = weight.shape
    g = pack.check_int4_shape(k, group_size)
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


__all__ = ["gptq_int4"]
