"""Low-rank factorization by truncated SVD: one Linear (or Conv2d) becomes two smaller layers.

A weight W (m, n) — a conv kernel read as (out, in*kh*kw) — is replaced by the best rank-r
approximation (Eckart–Young): ``W ≈ (U_r √S_r)(√S_r V_r^T)``, so the squared Frobenius error is
exactly the energy of the discarded singular values. It stores r*(m+n) weights instead of m*n,
which is only smaller when ``r < mn/(m+n)``; layers where the chosen rank is not smaller are left
alone with the reason. The rank comes from a kept-parameter ratio per layer, from a retained
energy, or per layer from measured sensitivity under an overall parameter budget
(``allocation="sensitivity"``, see ``sensitivity.py``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.factorize.allocation import allocate_ranks
from slimkit.factorize.layers import (
    ALLOCATIONS,
    FactorizeConfig,
    check_multiple,
    check_ratio,
    chosen_layers,
    factorize_layers,
    is_spatial,
    not_smaller,
    round_rank,
    too_few_inputs,
    weight_params,
)
from slimkit.factorize.modules import LowRankConv2d, LowRankLinear, conv_geometry


@technique("factorize.SVD", stage="factorize", search="svd")
@dataclasses.dataclass(frozen=True)
class SVD(FactorizeConfig):
    """Truncated SVD of Linear (and Conv2d) weights.

    ``rank_ratio``: fraction of each layer's weights to keep (``allocation="uniform"``), or of all
    targeted layers' weights together, spread by measured sensitivity (``"sensitivity"``).
    ``energy``: if set, each layer keeps the smallest rank whose singular values hold this fraction
    of the squared Frobenius norm (``rank_ratio`` is then ignored). ``targets``/``exclude`` as in
    quantization: ``"all"`` (Linear + Conv2d), ``"all-linear"``, a regex, or module names.
    ``keep_output`` leaves the model's output layer whole (found by running the task's example).
    ``rank_multiple`` moves every rank to the nearest multiple (8 suits AVX2 CPU kernels; the kept
    ratio is then approximate: the record lists the real parameter counts).
    """
    spatial: ClassVar[bool] = False  # Linear layers too

    rank_ratio: float = 0.5
    energy: float | None = None
    allocation: str = "uniform"
    targets: str | tuple[str, ...] = "all-linear"
    exclude: str | tuple[str, ...] = ()
    keep_output: bool = True
    rank_multiple: int = 1

    def __post_init__(self) -> None:
        check_ratio("rank_ratio", self.rank_ratio)
        check_multiple(self.rank_multiple)
        check_ratio("energy", self.energy, optional=True)
        if self.allocation not in ALLOCATIONS:
            raise SlimkitError(f"allocation={self.allocation!r} is not supported", f"use one of {ALLOCATIONS}")
        if self.energy is not None and self.allocation != "uniform":
            raise SlimkitError("energy= and allocation='sensitivity' both choose the ranks",
                               "give one: energy=0.9, or rank_ratio with allocation='sensitivity'")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return factorize_with_svd(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> SVD:
        return cls(rank_ratio=trial.suggest_float("svd.rank_ratio", 0.1, 0.7),
                   allocation=trial.suggest_categorical("svd.allocation", ["uniform", "sensitivity"]))




def as_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as the matrix the SVD factorizes: Linear (out, in), Conv2d (out, in*kh*kw)."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left (m, r), right (r, n))`` with ``left @ right`` the best rank-r approximation of ``matrix``."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)  # (m, k), (k,), (k, n)
    root = s[:rank].sqrt()
    left = u[:, :rank] * root          # (m, r)
    right = root[:, None] * vh[:rank]  # (r, n)
    return left.to(matrix.dtype), right.to(matrix.dtype)


def singular_values(layer: nn.Module) -> torch.Tensor:
    return torch.linalg.svdvals(as_matrix(layer).double())


def break_even_rank(m: int, n: int) -> float:
    """Ranks below ``mn/(m+n)`` make the two factors smaller than the matrix."""
    return m * n / (m + n)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Largest rank whose factors hold at most ``ratio`` of the m*n weights (at least 1)."""
    return max(1, math.floor(ratio * m * n / (m + n)))


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep ``energy`` of sum(s^2)."""
    kept = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def low_rank(layer: nn.Module, rank: int) -> nn.Module:
    """A ``LowRankLinear``/``LowRankConv2d`` holding the rank-``rank`` SVD of ``layer`` (bias copied)."""
    w = as_matrix(layer)
    rank = min(rank, *w.shape)
    left, right = truncated_svd(w, rank)
    if isinstance(layer, nn.Linear):
        new: nn.Module = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        new.first.weight.data.copy_(right)   # (r, in)
        new.second.weight.data.copy_(left)   # (out, r)
    else:
        geo = conv_geometry(layer)
        new = LowRankConv2d(rank=rank, **geo)
        new.first.weight.data.copy_(right.reshape(rank, *layer.weight.shape[1:]))  # (r, in, kh, kw)
        new.second.weight.data.copy_(left[:, :, None, None])                       # (out, r, 1, 1)
    new = new.to(layer.weight.dtype)
    if layer.bias is not None:
        new.second.bias.data.copy_(layer.bias.detach())
    return new


def svd_plan(rank_of: Any, multiple: int = 1) -> Any:
    """A ``factorize_layers`` plan: ``rank_of(name, layer) -> rank`` (moved to a multiple of
    ``multiple``), skipping ranks that do not shrink the layer."""

    def plan(name: str, layer: nn.Module) -> tuple[nn.Module, dict[str, Any]] | str:
        m, n = as_matrix(layer).shape
        rank = round_rank(int(rank_of(name, layer)), multiple, min(m, n))
        bias = 0 if layer.bias is None else layer.bias.numel()
        reason = not_smaller(rank * (m + n) + bias, weight_params(layer))
        if reason:
            return f"rank {rank} >= mn/(m+n) = {break_even_rank(m, n):.1f}: {reason}"
        return low_rank(layer, rank), {"method": "svd", "rank": rank, "shape": [m, n]}

    return plan


def svd_candidate(layer: nn.Module, fraction: float) -> tuple[int, int, torch.Tensor]:
    """The rank keeping ``fraction`` of the layer's weights, its parameter count and the rank-r weight."""
    matrix = as_matrix(layer)
    m, n = matrix.shape
    rank = rank_for_ratio(m, n, fraction)
    left, right = truncated_svd(matrix, rank)
    return rank, rank * (m + n) + weight_params(layer) - m * n, left @ right


#: ``conv_candidate(conv, fraction) -> (rank, params, weight)``: a method's form of a kxk conv at a budget.
ConvCandidate = Callable[[nn.Conv2d, float], "tuple[Any, int, torch.Tensor]"]
#: ``conv_plan(name, conv, rank)``: the factorized conv at ``rank`` (None: the config's own rule).
ConvPlan = Callable[[str, nn.Conv2d, Any], "tuple[nn.Module, dict[str, Any]] | str"]


def factorize_kernels(model: nn.Module, config: BaseConfig, task: Task | None, conv_plan: ConvPlan,
                      conv_candidate: ConvCandidate) -> nn.Module:
    """The Tucker/CP handler body: kxk convs with enough input channels go to ``conv_plan``; Linear
    and 1x1 layers get the truncated SVD. Ranks keep ``config.ratio`` of each layer's weights, or
    (``allocation="sensitivity"``) of all the layers' weights together, spread by measured sensitivity."""
    names = chosen_layers(model, config.targets, config.exclude, config.type_name)
    kernels = lambda layer: is_spatial(layer) and too_few_inputs(layer) is None  # noqa: E731
    ranks: dict[str, Any] | None = None
    if config.allocation == "sensitivity":
        ranks = allocate_ranks(model, names, config.ratio, task,
                               lambda layer, frac: conv_candidate(layer, frac) if kernels(layer)
                               else svd_candidate(layer, frac), config.type_name)

    def rank_of(name: str, layer: nn.Module) -> int:
        if ranks is not None:
            return ranks.get(name, min(as_matrix(layer).shape))  # a layer kept whole gets a "full" rank: skipped
        return rank_for_ratio(layer.weight.shape[0], layer.weight[0].numel(), config.ratio)

    matrix_plan = svd_plan(rank_of, config.rank_multiple)

    def plan(name: str, layer: nn.Module) -> tuple[nn.Module, dict[str, Any]] | str:
        if not is_spatial(layer):
            return matrix_plan(name, layer)
        if too_few_inputs(layer):
            return too_few_inputs(layer)
        if ranks is not None and name not in ranks:
            return "kept whole by the sensitivity allocation (factorizing it costs the most output error)"
        return conv_plan(name, layer, None if ranks is None else ranks[name])

    with torch.no_grad():
        return factorize_layers(model, config, names, plan, task)


def factorize_with_svd(model: nn.Module, config: SVD, task: Task | None) -> nn.Module:
    names = chosen_layers(model, config.targets, config.exclude, "factorize.SVD")
    if config.energy is not None:
        def rank_of(name: str, layer: nn.Module) -> int:
            return rank_for_energy(singular_values(layer), config.energy)
    elif config.allocation == "sensitivity":
        ranks = allocate_ranks(model, names, config.rank_ratio, task, svd_candidate, config.type_name)

        def rank_of(name: str, layer: nn.Module) -> int:
            return ranks.get(name, min(as_matrix(layer).shape))  # a layer kept whole gets a "full" rank: skipped
    else:
        def rank_of(name: str, layer: nn.Module) -> int:
            return rank_for_ratio(*as_matrix(layer).shape, config.rank_ratio)
    with torch.no_grad():
        return factorize_layers(model, config, names, svd_plan(rank_of, config.rank_multiple), task)

