"""Lottery tickets with rewinding (Frankle et al. 2019/2020): train, prune, rewind, retrain.

The surviving weights go back to their values at an early training iteration ``k`` (not to the
final ones, and not to fresh random values), and the sparse network is retrained with the same
budget. :func:`reinit_like` builds the control: same mask, fresh random weights.

Training is any callable ``train(model, after_step)`` that runs the whole budget and calls
``after_step(model, step)`` after each optimizer step (``slimkit.train.finetune`` does); the
``prune.Lottery`` step trains with ``finetune`` on the task for ``steps`` steps each time.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.nn as nn

from slimkit.core.config import technique
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.prune.magnitude import TrainedMagnitude, check_amount, magnitude_masks
from slimkit.prune.record import record_sparsity
from slimkit.train.finetune import finetune
from slimkit.train.masks import AfterStep, Masks, apply_masks, global_sparsity, masked, prunable

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

    def state_dict(self) -> dict[str, Any]:
        """Kept in fine-tuning checkpoints: a resumed run still knows the weights to rewind to."""
        return {"state": self.state, "then": self.then.state_dict() if hasattr(self.then, "state_dict") else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state["state"]
        if state.get("then") is not None and hasattr(self.then, "load_state_dict"):
            self.then.load_state_dict(state["then"])

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


@technique("prune.Lottery", stage="prune")
@dataclasses.dataclass(frozen=True)
class Lottery(TrainedMagnitude):
    """Iterative magnitude pruning with rewinding: train ``steps``, prune, rewind to ``rewind_step``, retrain."""

    amount: float = 0.8
    rewind_step: int = 0
    rounds: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.rewind_step < self.steps:
            raise SlimkitError(f"prune.Lottery steps={self.steps!r}, rewind_step={self.rewind_step!r}",
                               "use steps >= 1 and 0 <= rewind_step < steps")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise SlimkitError(f"prune.Lottery rounds={self.rounds!r} is invalid", "use 1 or more rounds")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        task = self.training_task(task)

        def train(m: nn.Module, after_step: AfterStep) -> None:
            finetune(m, task, steps=self.steps, lr=self.lr, seed=self.seed, after_step=after_step,
                     restore_best=False, progress=False,
                     label=f"lottery ticket {task.name}")

        ticket = find_ticket(model, train, amount=self.amount, rewind_step=self.rewind_step, rounds=self.rounds,
                             scope=self.scope, targets=self.targets, exclude=self.exclude)
        names, skipped = prunable(ticket.model, self.targets, self.exclude)
        record_sparsity(ticket.model, self, names, skipped,
                        history=[(self.steps * (r + 1), s) for r, s in enumerate(ticket.rounds)])
        return ticket.model.eval()


