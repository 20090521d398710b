"""Tucker-2 decomposition of Conv2d kernels along the output and input channels.

A kernel W (out, in, kh, kw) ≈ G ×_0 U_out ×_1 U_in with U_out (out, r_out), U_in (in, r_in) and
a core G (r_out, r_in, kh, kw): the conv becomes 1x1 (in -> r_in), kxk (r_in -> r_out), 1x1
(r_out -> out). U are initialised by HOSVD (leading left singular vectors of each unfolding) and
optionally refined by HOOI (alternating: each factor from the SVD of W projected on the other).
For a Linear or a 1x1 conv, Tucker-2 *is* the truncated SVD, so those layers get ``svd.low_rank``
at the same parameter ratio — a pipeline "Tucker at 1/3 of the parameters" covers the whole model.
"""

from __future__ import annotations

import dataclasses
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
from slimkit.factorize.modules import TuckerConv2d, conv_geometry
from slimkit.factorize.svd import factorize_kernels


@technique("factorize.Tucker", stage="factorize", search="tucker")
@dataclasses.dataclass(frozen=True)
class Tucker(FactorizeConfig):
    """Tucker-2 of kxk convs (+ SVD of Linear / 1x1 layers) keeping ``ratio`` of each layer's weights,
    or fixed ``ranks=(r_out, r_in)`` for every conv (clipped to its channels). ``allocation="sensitivity"``
    keeps ``ratio`` of all targeted layers' weights together, spread by measured output sensitivity. ``hooi_iters`` HOOI
    sweeps refine the HOSVD start (0 = plain HOSVD). ``rank_multiple`` moves every rank to the nearest
    multiple (8: ONNX Runtime's AVX2 conv block; measured on the mnist CNN in BENCHMARKS.md)."""

    ratio: float = 0.3
    allocation: str = "uniform"
    ranks: tuple[int, int] | None = None
    hooi_iters: int = 5
    targets: str | tuple[str, ...] = "all"
    exclude: str | tuple[str, ...] = ()
    keep_output: bool = True
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        check_ratio("ratio", self.ratio)
        check_multiple(self.rank_multiple)
        check_allocation(self.allocation, self.ranks is not None)
        if self.ranks is not None and (len(self.ranks) != 2 or not all(isinstance(r, int) and r >= 1 for r in self.ranks)):
            raise SlimkitError(f"ranks={self.ranks!r} is invalid", "give two positive integers (r_out, r_in)")
        if not isinstance(self.hooi_iters, int) or self.hooi_iters < 0:
            raise SlimkitError(f"hooi_iters={self.hooi_iters!r} is invalid", "use 0 (HOSVD only) or more sweeps")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return factorize_with_tucker(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Tucker:
        return cls(ratio=trial.suggest_float("tucker.ratio", 0.1, 0.6))




def _leading(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of ``matrix`` (rows, rank)."""
    u, _, _ = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank]


def tucker2(kernel: torch.Tensor, rank_out: int, rank_in: int, hooi_iters: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(core (r_out, r_in, kh, kw), u_out (out, r_out), u_in (in, r_in))`` of a conv kernel, in float64."""
    w = kernel.double()                                              # (O, I, kh, kw)
    o, i = w.shape[:2]
    u_out = _leading(w.reshape(o, -1), rank_out)                     # mode-0 unfolding (O, I*kh*kw)
    u_in = _leading(w.transpose(0, 1).reshape(i, -1), rank_in)       # mode-1 unfolding (I, O*kh*kw)
    for _ in range(hooi_iters):
        y = torch.einsum("oikl,ib->obkl", w, u_in)                   # (O, r_in, kh, kw)
        u_out = _leading(y.reshape(o, -1), rank_out)
        y = torch.einsum("oikl,oa->iakl", w, u_out)                  # (I, r_out, kh, kw)
        u_in = _leading(y.reshape(i, -1), rank_in)
    core = torch.einsum("oikl,oa,ib->abkl", w, u_out, u_in)          # (r_out, r_in, kh, kw)
    return core, u_out, u_in


def tucker2_reconstruct(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    return torch.einsum("abkl,oa,ib->oikl", core, u_out, u_in)     # (O, I, kh, kw)


def tucker_params(conv: nn.Conv2d, rank_out: int, rank_in: int) -> int:
    kh, kw = conv.weight.shape[2:]
    bias = 0 if conv.bias is None else conv.out_channels
    return conv.in_channels * rank_in + rank_in * rank_out * kh * kw + rank_out * conv.out_channels + bias


def ranks_for_ratio(conv: nn.Conv2d, ratio: float) -> tuple[int, int]:
    """The largest (r_out, r_in), each the same fraction of its channels, within ``ratio`` of the weights."""
    o, i = conv.out_channels, conv.in_channels
    budget = ratio * weight_params(conv)
    best = (1, 1)
    for k in range(1, max(o, i) + 1):
        r_out, r_in = max(1, round(o * k / max(o, i))), max(1, round(i * k / max(o, i)))
        if tucker_params(conv, r_out, r_in) <= budget:
            best = (r_out, r_in)
    return best


def tucker_conv(conv: nn.Conv2d, rank_out: int, rank_in: int, hooi_iters: int = 0) -> TuckerConv2d:
    """A ``TuckerConv2d`` holding the Tucker-2 decomposition of ``conv`` (bias copied)."""
    core, u_out, u_in = tucker2(conv.weight.detach(), rank_out, rank_in, hooi_iters)
    new = TuckerConv2d(rank_in=rank_in, rank_out=rank_out, **conv_geometry(conv)).to(conv.weight.dtype)
    dtype = conv.weight.dtype
    new.first.weight.data.copy_(u_in.T[:, :, None, None].to(dtype))   # (r_in, in, 1, 1)
    new.core.weight.data.copy_(core.to(dtype))                        # (r_out, r_in, kh, kw)
    new.last.weight.data.copy_(u_out[:, :, None, None].to(dtype))     # (out, r_out, 1, 1)
    if conv.bias is not None:
        new.last.bias.data.copy_(conv.bias.detach())
    return new


def factorize_with_tucker(model: nn.Module, config: Tucker, task: Task | None) -> nn.Module:
    def candidate(conv: nn.Conv2d, fraction: float) -> tuple[tuple[int, int], int, torch.Tensor]:
        r_out, r_in = ranks_for_ratio(conv, fraction)
        core, u_out, u_in = tucker2(conv.weight.detach(), r_out, r_in, config.hooi_iters)
        return (r_out, r_in), tucker_params(conv, r_out, r_in), tucker2_reconstruct(core, u_out, u_in)

    def conv_plan(name: str, layer: nn.Module, allocated: tuple[int, int] | None) -> tuple[nn.Module, dict[str, Any]] | str:
        if allocated is not None:
            r_out, r_in = allocated
        elif config.ranks is not None:
            r_out, r_in = min(config.ranks[0], layer.out_channels), min(config.ranks[1], layer.in_channels)
        else:
            r_out, r_in = ranks_for_ratio(layer, config.ratio)
        r_out = round_rank(r_out, config.rank_multiple, layer.out_channels)
        r_in = round_rank(r_in, config.rank_multiple, layer.in_channels)
        reason = not_smaller(tucker_params(layer, r_out, r_in), weight_params(layer))
        if reason:
            return f"Tucker ranks ({r_out}, {r_in}): {reason}"
        return tucker_conv(layer, r_out, r_in, config.hooi_iters), {"method": "tucker", "rank": [r_out, r_in]}

    return factorize_kernels(model, config, task, conv_plan, candidate)

