"""Pruning schedules: one-shot, and gradual with the cubic schedule of Zhu & Gupta (2017).

Gradual pruning raises sparsity from ``initial`` to ``final`` over ``n`` pruning steps spaced
``every`` training steps apart, fastest at first (when many weights are redundant) and slowly at
the end (when the network has less room to recover):

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * every)) ** 3,   t = t0, t0 + every, ..., t0 + n * every

Fine-tuning between pruning steps is any callable, ``finetune(model, steps, after_step)``, e.g.
``lambda m, k, cb: slimkit.train.finetune(m, task, steps=k, after_step=cb, restore_best=False)``.
Every schedule returns its history of ``(step, achieved sparsity)`` for the trend plot.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.prune.magnitude import check_amount, magnitude_masks
from slimkit.train.masks import AfterStep, Masks, apply_masks, global_sparsity, masked, prunable

FineTune = Callable[[nn.Module, int, AfterStep], Any]
History = list[tuple[int, float]]


def cubic_sparsity(step: int, *, final: float, initial: float = 0.0, start: int = 0, n: int = 10,
                   every: int = 100) -> float:
    """Target sparsity at training ``step`` (held at ``initial`` before ``start``, ``final`` after the end)."""
    _check(final, initial, n, every)
    if step <= start:
        return initial
    span = n * every
    if step >= start + span:
        return final
    return final + (initial - final) * (1.0 - (step - start) / span) ** 3


def _check(final: float, initial: float, n: int, every: int) -> None:
    check_amount(final)
    check_amount(initial)
    if initial > final:
        raise SlimkitError(f"initial sparsity {initial} is above final {final}", "use initial <= final")
    if n < 1 or every < 1:
        raise SlimkitError(f"n={n}, every={every}: a schedule needs at least one step", "use n >= 1, every >= 1")


class CubicPruner:
    """``after_step`` callback that prunes on the cubic schedule during one long fine-tuning run.

    At steps ``start, start + every, ..., start + n * every`` it re-computes magnitude masks for the
    scheduled sparsity; after every step it re-applies the current masks. ``history`` holds the
    sparsity reached at each pruning step.
    """

    def __init__(self, model: nn.Module, *, final: float, initial: float = 0.0, start: int = 0, n: int = 10,
                 every: int = 100, scope: str = "global", targets: str | tuple[str, ...] = "all",
                 exclude: str | tuple[str, ...] = ()) -> None:
        _check(final, initial, n, every)
        self.final, self.initial, self.start, self.n, self.every, self.scope = final, initial, start, n, every, scope
        self.names, self.skipped = prunable(model, targets, exclude)
        self.masks: Masks = {}
        self.history: History = []

    def is_pruning_step(self, step: int) -> bool:
        k, rest = divmod(step - self.start, self.every)
        return step >= self.start and rest == 0 and k <= self.n

    def prune(self, model: nn.Module, step: int) -> float:
        """Prune to the scheduled sparsity of ``step`` now; returns the sparsity reached."""
        target = cubic_sparsity(step, final=self.final, initial=self.initial, start=self.start, n=self.n,
                                every=self.every)
        self.masks = magnitude_masks(model, self.names, target, self.scope)
        apply_masks(model, self.masks)
        reached = global_sparsity(model, self.names)
        self.history.append((step, reached))
        return reached

    def state_dict(self) -> dict[str, Any]:
        """What a fine-tuning checkpoint keeps so a resumed schedule continues exactly."""
        return {"masks": dict(self.masks), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state["masks"])
        self.history = [(int(s), float(v)) for s, v in state["history"]]

    def __call__(self, model: nn.Module, step: int) -> None:
        if self.is_pruning_step(step):
            self.prune(model, step)
        elif self.masks:
            apply_masks(model, self.masks)


def gradual(model: nn.Module, finetune: FineTune, *, final: float, initial: float = 0.0, n: int = 10,
            every: int = 100, start: int = 0, recover: int | None = None, scope: str = "global",
            targets: str | tuple[str, ...] = "all", exclude: str | tuple[str, ...] = ()) -> History:
    """Prune ``model`` in place on the cubic schedule, fine-tuning ``every`` steps after each pruning step.

    ``recover`` fine-tuning steps follow the last pruning step (default ``every``; 0 for none).
    Pruned weights stay zero throughout (see :func:`slimkit.prune.masked`).
    """
    pruner = CubicPruner(model, final=final, initial=initial, start=start, n=n, every=every, scope=scope,
                         targets=targets, exclude=exclude)
    for i in range(n + 1):
        pruner.prune(model, start + i * every)
        steps = every if i < n else (every if recover is None else recover)
        if steps:
            with masked(model, pruner.masks) as remask:
                finetune(model, steps, remask)
    return pruner.history


def one_shot(model: nn.Module, amount: float, finetune: FineTune | None = None, steps: int = 0, *,
             scope: str = "global", targets: str | tuple[str, ...] = "all",
             exclude: str | tuple[str, ...] = ()) -> History:
    """Prune ``amount`` at once, then optionally fine-tune ``steps`` with the masks enforced."""
    names, _ = prunable(model, targets, exclude)
    masks = magnitude_masks(model, names, amount, scope)
    apply_masks(model, masks)
    history: History = [(0, global_sparsity(model, names))]
    if finetune is not None and steps:
        with masked(model, masks) as remask:
            finetune(model, steps, remask)
        history.append((steps, global_sparsity(model, names)))
    return history
