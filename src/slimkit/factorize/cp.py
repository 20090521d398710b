"""CP (CANDECOMP/PARAFAC) decomposition of Conv2d kernels by alternating least squares.

W (out, in, kh, kw) ≈ Σ_r a_out[:, r] ∘ a_in[:, r] ∘ a_h[:, r] ∘ a_w[:, r]: the conv becomes a
1x1 conv (in -> R), a (kh x 1) and a (1 x kw) depthwise conv over the R channels, and a 1x1 conv
(R -> out) — R*(in + kh + kw + out) weights (Lebedev et al., 2015). ALS updates one factor at a
time by least squares with the others fixed (``M V^+`` with V the Hadamard product of the other
factors' Gram matrices), starting from the leading singular vectors of each unfolding. Linear and
1x1 layers get the truncated SVD (a rank-R CP of a matrix) at the same parameter ratio.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.config import technique
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.factorize.layers import (
    FactorizeConfig,
    check_allocation,
    check_multiple,
    check_ratio,
    not_smaller,
    round_rank,
    weight_params,
)
from slimkit.factorize.modules import CPConv2d, conv_geometry
from slimkit.factorize.svd import factorize_kernels

_MODES = "abcdefgh"


@technique("factorize.CP", stage="factorize", search="cp")
@dataclasses.dataclass(frozen=True)
class CP(FactorizeConfig):
    """CP of kxk convs (+ SVD of Linear / 1x1 layers): ``rank`` for every conv, or the largest rank
    within ``ratio`` of each layer's weights; ``iters`` ALS sweeps (stops early once converged);
    ``rank_multiple`` moves every rank to the nearest multiple; ``allocation`` as in ``Tucker``."""

    ratio: float = 0.3
    allocation: str = "uniform"
    rank: int | None = None
    iters: int = 100
    targets: str | tuple[str, ...] = "all"
    exclude: str | tuple[str, ...] = ()
    keep_output: bool = True
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_multiple(self.rank_multiple)
        check_allocation(self.allocation, self.rank is not None)
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise SlimkitError(f"rank={self.rank!r} is invalid", "use a positive integer CP rank")
        if not isinstance(self.iters, int) or self.iters < 1:
            raise SlimkitError(f"iters={self.iters!r} is invalid", "use at least 1 ALS sweep")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return factorize_with_cp(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> CP:
        return cls(ratio=trial.suggest_float("cp.ratio", 0.1, 0.6))




def cp_reconstruct(factors: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor Σ_r ∘_n factors[n][:, r]."""
    spec = ",".join(f"{_MODES[n]}r" for n in range(len(factors))) + "->" + _MODES[:len(factors)]
    return torch.einsum(spec, *factors)


def _init(tensor: torch.Tensor, rank: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Leading left singular vectors of each unfolding, padded with random columns past its size."""
    factors = []
    for n, size in enumerate(tensor.shape):
        unfold = tensor.movedim(n, 0).reshape(size, -1)   # (I_n, prod others)
        u = torch.linalg.svd(unfold, full_matrices=False)[0][:, :rank]
        if u.shape[1] < rank:
            extra = torch.randn(size, rank - u.shape[1], generator=gen, dtype=tensor.dtype)
            u = torch.cat([u, extra / math.sqrt(size)], 1)
        factors.append(u)
    return factors


def cp_als(tensor: torch.Tensor, rank: int, iters: int = 100, tol: float = 1e-12, seed: int = 0) -> list[torch.Tensor]:
    """Factors ``[(I_0, R), (I_1, R), ...]`` (float64) of a rank-``rank`` CP fit of ``tensor``.

    Stops when the relative error changes by less than ``tol``; column norms are balanced across
    modes at the end so no factor holds all the scale (steadier to fine-tune).
    """
    x = tensor.double()
    n_modes = x.dim()
    gen = torch.Generator().manual_seed(seed)
    factors = _init(x, rank, gen)
    norm = x.norm()
    previous = float("inf")
    eye = torch.eye(rank, dtype=x.dtype)
    for _ in range(iters):
        for n in range(n_modes):
            others = [m for m in range(n_modes) if m != n]
            spec = _MODES[:n_modes] + "," + ",".join(f"{_MODES[m]}r" for m in others) + f"->{_MODES[n]}r"
            mttkrp = torch.einsum(spec, x, *[factors[m] for m in others])  # (I_n, R)
            gram = torch.ones(rank, rank, dtype=x.dtype)
            for m in others:
                gram = gram * (factors[m].T @ factors[m])                   # (R, R)
            ridge = 1e-12 * gram.diagonal().abs().max().clamp(min=1e-30)
            factors[n] = torch.linalg.solve(gram + ridge * eye, mttkrp.T).T
        error = float((x - cp_reconstruct(factors)).norm() / norm.clamp(min=1e-30))
        if abs(previous - error) < tol:
            break
        previous = error
    scale = torch.stack([f.norm(dim=0).clamp(min=1e-30) for f in factors])  # (modes, R)
    common = scale.prod(0) ** (1.0 / n_modes)                                # (R,)
    return [f / s * common for f, s in zip(factors, scale)]


def cp_params(conv: nn.Conv2d, rank: int) -> int:
    o, i, kh, kw = conv.weight.shape
    return rank * (o + i + kh + kw) + (0 if conv.bias is None else o)


def cp_conv(conv: nn.Conv2d, rank: int, iters: int = 100) -> CPConv2d:
    """A ``CPConv2d`` holding the rank-``rank`` CP fit of ``conv`` (bias copied)."""
    a_out, a_in, a_h, a_w = cp_als(conv.weight.detach(), rank, iters)
    new = CPConv2d(rank=rank, **conv_geometry(conv)).to(conv.weight.dtype)
    dtype = conv.weight.dtype
    new.first.weight.data.copy_(a_in.T[:, :, None, None].to(dtype))        # (R, in, 1, 1)
    new.vertical.weight.data.copy_(a_h.T[:, None, :, None].to(dtype))      # (R, 1, kh, 1)
    new.horizontal.weight.data.copy_(a_w.T[:, None, None, :].to(dtype))    # (R, 1, 1, kw)
    new.last.weight.data.copy_(a_out[:, :, None, None].to(dtype))          # (out, R, 1, 1)
    if conv.bias is not None:
        new.last.bias.data.copy_(conv.bias.detach())
    return new


def rank_for_ratio(conv: nn.Conv2d, ratio: float) -> int:
    """The largest CP rank whose four factors hold at most ``ratio`` of the kernel's weights."""
    o, i, kh, kw = conv.weight.shape
    return max(1, math.floor(ratio * conv.weight.numel() / (o + i + kh + kw)))


#: ALS sweeps per candidate when ranking layers by sensitivity (the chosen rank is then fitted with ``iters``).
RANKING_ITERS = 15


def factorize_with_cp(model: nn.Module, config: CP, task: Task | None) -> nn.Module:
    def candidate(conv: nn.Conv2d, fraction: float) -> tuple[int, int, torch.Tensor]:
        rank = rank_for_ratio(conv, fraction)
        factors = cp_als(conv.weight.detach(), rank, iters=min(config.iters, RANKING_ITERS))
        return rank, cp_params(conv, rank), cp_reconstruct(factors)

    def conv_plan(name: str, layer: nn.Module, allocated: int | None) -> tuple[nn.Module, dict[str, Any]] | str:
        rank = allocated or config.rank or rank_for_ratio(layer, config.ratio)
        rank = round_rank(rank, config.rank_multiple, layer.weight.numel())
        reason = not_smaller(cp_params(layer, rank), weight_params(layer))
        if reason:
            return f"CP rank {rank}: {reason}"
        return cp_conv(layer, rank, config.iters), {"method": "cp", "rank": rank}

    return factorize_kernels(model, config, task, conv_plan, candidate)

