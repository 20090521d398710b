"""Unstructured magnitude pruning: zero the smallest |w| of Linear/Conv weights, globally or per layer.

Counts are exact: ``amount`` of the weights (rounded to whole weights) become zero, ties at
the threshold are broken by position, and weights that are already zero go first, so pruning
again to a higher amount (gradual schedules) never revives a pruned weight.
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
from slimkit.prune.record import PruneConfig, record_sparsity
from slimkit.train.masks import Masks, apply_masks, prunable, weight

Targets = str | tuple[str, ...]
SCOPES = ("global", "layer")


def check_amount(amount: object) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= float(amount) < 1.0:
        raise SlimkitError(f"amount={amount!r} is not a fraction of weights to prune",
                           "use a number in [0, 1), e.g. 0.5 to zero half of the weights")


@technique("prune.Magnitude", stage="prune", search="magnitude")
@dataclasses.dataclass(frozen=True)
class Magnitude(PruneConfig):
    """Zero ``amount`` of the weights with the smallest magnitude.

    ``scope="global"`` ranks all targeted weights together (layers end up with different
    sparsities, usually better accuracy); ``"layer"`` prunes ``amount`` of every layer.
    ``targets``: ``"all"`` (Linear + Conv2d), ``"all-linear"``, a regex or module names.
    """

    amount: float = 0.5
    scope: str = "global"
    targets: Targets = "all"
    exclude: Targets = ()

    def __post_init__(self) -> None:
        check_amount(self.amount)
        if self.scope not in SCOPES:
            raise SlimkitError(f"scope={self.scope!r} is not supported", "use 'global' or 'layer'")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return prune_magnitude(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Magnitude:
        return cls(amount=round(trial.suggest_float("magnitude.amount", 0.3, 0.95, step=0.05), 2))



def smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (like ``scores``), True at exactly the ``k`` smallest entries (ties: first positions)."""
    flat = scores.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    if k <= 0:
        return out.view(scores.shape)
    if k >= flat.numel():
        return torch.ones_like(out).view(scores.shape)
    threshold = flat.kthvalue(k).values  # O(n), no full sort of a possibly huge vector
    out = flat < threshold
    ties = (flat == threshold).nonzero().flatten()
    out[ties[: k - int(out.sum())]] = True
    return out.view(scores.shape)


def magnitude_masks(model: nn.Module, names: list[str], amount: float, scope: str = "global") -> Masks:
    """Keep-masks pruning ``amount`` of the named layers' weights by |w|."""
    check_amount(amount)
    scores = {n: weight(model, n).detach().abs().float().cpu() for n in names}
    if scope == "layer":
        return {n: ~smallest(s, round(amount * s.numel())) for n, s in scores.items()}
    if scope != "global":
        raise SlimkitError(f"scope={scope!r} is not supported", "use 'global' or 'layer'")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])  # (all weights,)
    drop = smallest(flat, round(amount * flat.numel()))
    masks, start = {}, 0
    for n, s in scores.items():
        masks[n] = ~drop[start:start + s.numel()].view(s.shape)
        start += s.numel()
    return masks


def prune_magnitude(model: nn.Module, config: Magnitude, task: Task | None = None) -> nn.Module:
    names, skipped = prunable(model, config.targets, config.exclude)
    apply_masks(model, magnitude_masks(model, names, config.amount, config.scope))
    record_sparsity(model, config, names, skipped)
    return model


@dataclasses.dataclass(frozen=True)
class TrainedMagnitude(PruneConfig):
    """Magnitude pruning interleaved with fine-tuning (gradual schedules, lottery tickets): shared options."""

    amount: float = 0.5
    steps: int = 200
    lr: float = 1e-3
    scope: str = "global"
    targets: Targets = "all"
    exclude: Targets = ()
    seed: int = 0

    def __post_init__(self) -> None:
        check_amount(self.amount)
        if self.scope not in SCOPES:
            raise SlimkitError(f"scope={self.scope!r} is not supported", "use 'global' or 'layer'")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise SlimkitError(f"{self.type_name} steps={self.steps!r} is invalid", "use a positive number of steps")
        if not self.lr > 0:
            raise SlimkitError(f"{self.type_name} lr={self.lr!r} is invalid", "use a positive learning rate, e.g. 1e-3")

    def training_task(self, task: Task | None) -> Task:
        """The task, checked to have what fine-tuning between prunings needs."""
        if task is None or not task.train or task.loss is None:
            raise SlimkitError(f"{self.type_name} fine-tunes between pruning steps and needs a task with training "
                               "data and a loss", "give the Task train batches and a loss, or use prune.Magnitude")
        return task

