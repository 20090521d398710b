"""``prune.Gradual``: magnitude pruning on the cubic schedule of Zhu & Gupta (2017), inside one fine-tuning run.

Sparsity rises from 0 to ``amount`` over ``prunings`` pruning steps spread across the first part of
``steps`` fine-tuning steps, fastest at first; the last interval recovers with the final masks.
Weights once pruned stay zero. The schedule's masks are part of the fine-tuning checkpoint, so a
killed run resumes to the same weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.nn as nn

from slimkit.core.config import technique
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.prune.magnitude import TrainedMagnitude
from slimkit.prune.record import record_sparsity
from slimkit.prune.schedule import CubicPruner
from slimkit.train.finetune import finetune
from slimkit.train.masks import global_sparsity, layer_sparsity


@technique("prune.Gradual", stage="prune")
@dataclasses.dataclass(frozen=True)
class Gradual(TrainedMagnitude):
    """Magnitude pruning to ``amount`` on a cubic schedule of ``prunings`` steps within ``steps`` of fine-tuning."""

    prunings: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.prunings, int) or self.prunings < 1:
            raise SlimkitError(f"prune.Gradual prunings={self.prunings!r} is invalid", "use 1 or more, e.g. 10")
        if not isinstance(self.steps, int) or self.steps < 2 * self.prunings:
            raise SlimkitError(f"a gradual schedule needs fine-tuning between its {self.prunings} pruning steps "
                               f"(steps={self.steps!r})", f"give steps={20 * self.prunings} or more")
        super().__post_init__()

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return prune_gradually(model, self, task)



class _Snapshotting(CubicPruner):
    """The cubic pruner, also keeping each pruning step's per-layer sparsity (the report's heatmap)."""

    def __init__(self, model: nn.Module, config: Gradual) -> None:
        super().__init__(model, final=config.amount, every=config.steps // (config.prunings + 1), n=config.prunings,
                         scope=config.scope, targets=config.targets, exclude=config.exclude)
        self.snapshots: list[tuple[int, dict[str, float]]] = []

    def prune(self, model: nn.Module, step: int) -> float:
        reached = super().prune(model, step)
        self.snapshots.append((step, layer_sparsity(model, self.names)))
        return reached

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "snapshots": [[s, dict(v)] for s, v in self.snapshots]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.snapshots = [(int(s), dict(v)) for s, v in state.get("snapshots", [])]


def prune_gradually(model: nn.Module, config: Gradual, task: Task | None) -> nn.Module:
    """Handler of :class:`Gradual`: fine-tune ``steps`` steps, pruning on the schedule along the way."""
    task = config.training_task(task)
    pruner = _Snapshotting(model, config)
    pruner.prune(model, 0)  # the schedule's starting point (sparsity 0) for the trend and heatmap
    finetune(model, task, steps=config.steps, lr=config.lr, seed=config.seed, after_step=pruner,
             restore_best=False, progress=False,
             label=f"gradual pruning {task.name}")
    history = pruner.history + [(config.steps, global_sparsity(model, pruner.names))]
    record_sparsity(model, config, pruner.names, pruner.skipped, history=history, snapshots=pruner.snapshots)
    return model.eval()
