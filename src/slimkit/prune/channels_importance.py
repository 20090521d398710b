"""Channel importance criteria for structured pruning: magnitude, BatchNorm scale, first-order Taylor, random."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.graph import dependency


def group_importance(kind: str, model: nn.Module, task: Task | None, taylor_batches: int) -> Any:
    """The torch-pruning importance criterion named ``kind`` (Taylor accumulates gradients first)."""
    tp = dependency.torch_pruning()
    if kind in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2)
    if kind == "bn_scale":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise SlimkitError("importance='bn_scale' needs BatchNorm layers and the model has none",
                               "use importance='l2' or 'taylor'")
        return tp.importance.BNScaleImportance()
    if kind == "random":
        return tp.importance.RandomImportance()
    _accumulate_gradients(model, task, taylor_batches)
    return tp.importance.GroupTaylorImportance()


def _accumulate_gradients(model: nn.Module, task: Task | None, batches: int) -> None:
    """dL/dw over a few training batches, for first-order Taylor importance."""
    train = getattr(task, "train", None)
    loss_fn = getattr(task, "loss", None)
    if not train or loss_fn is None:
        raise SlimkitError("importance='taylor' needs labelled training batches and a task loss",
                           "use a task with train data, or importance='l2'")
    model.zero_grad(set_to_none=True)
    for i, (inputs, labels) in enumerate(train):
        if i >= batches:
            break
        loss_fn(model(*inputs), labels).backward()
