"""Lottery tickets with rewinding (Frankle et al. 2019/2020): train, prune, rewind, retrain.

The surviving weights go back to their values at an early training iteration ``k`` (not to the
final ones, and not to fresh random values), and the sparse network is retrained with the same
budget. :func:`reinit_like` builds the control: same mask, fresh random weights.

Training is any callable ``train(model, after_step)`` that runs the whole budget and calls
``after_step(model, step)`` after each optimizer step (``slimkit.train.finetune`` does).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from slimkit.errors import SlimkitError
from slimkit.prune.magnitude import check_amount, magnitude_masks
from slimkit.prune.masks import AfterStep, Masks, apply_masks, global_sparsity, masked, prunable

Train = Callable[[nn.Module, AfterStep], Any]


@dataclasses.dataclass
class Ticket:
    model: nn.Module  # the retrained sparse network
    masks: Masks
    rewind_step: int
    rewind_state: dict[str, torch.Tensor]  # all weights and buffers at ``rewind_step``
    sparsity: float
    rounds: list[float]  # sparsity after each pruning round


class Snapshot:
    """``after_step`` callback that keeps a copy of the state dict right after step ``step``."""

    def __init__(self, step: int, then: AfterStep | None = None) -> None:
        self.step, self.then = step, then
        self.state: dict[str, torch.Tensor] | None = None

    def __call__(self, model: nn.Module, step: int) -> None:
        if step == self.step:
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.then is not None:
            self.then(model, step)


def find_ticket(model: nn.Module, train: Train, *, amount: float = 0.9, rewind_step: int = 0, rounds: int = 1,
                scope: str = "global", targets: str | tuple[str, ...] = "all",
                exclude: str | tuple[str, ...] = ()) -> Ticket:
    """Train ``model`` (in place), then ``rounds`` times: prune by magnitude, rewind to step ``rewind_step``, retrain.

    Each round prunes a further share so that round r reaches ``1 - (1 - amount) ** (r / rounds)``
    (iterative magnitude pruning); ``rewind_step=0`` rewinds to the initial weights.
    """
    check_amount(amount)
    if rounds < 1 or rewind_step < 0:
        raise SlimkitError(f"rounds={rounds}, rewind_step={rewind_step}", "use rounds >= 1 and rewind_step >= 0")
    names, _ = prunable(model, targets, exclude)
    snap = Snapshot(rewind_step)
    if rewind_step == 0:
        snap(model, 0)
    train(model, snap)
    if snap.state is None:
        raise SlimkitError(f"training never reached step {rewind_step} to rewind to",
                           "use a smaller rewind_step, or a train() that calls after_step(model, step)")
    masks: Masks = {}
    reached: list[float] = []
    for r in range(1, rounds + 1):
        masks = magnitude_masks(model, names, 1.0 - (1.0 - amount) ** (r / rounds), scope)
        model.load_state_dict(snap.state)
        with masked(model, masks) as remask:
            train(model, remask)
        reached.append(global_sparsity(model, names))
    return Ticket(model=model, masks=masks, rewind_step=rewind_step, rewind_state=snap.state,
                  sparsity=reached[-1], rounds=reached)


def reinit_like(model: nn.Module, masks: Masks, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with fresh random weights (every ``reset_parameters``) and the same masks."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    apply_masks(fresh, masks)
    return fresh
