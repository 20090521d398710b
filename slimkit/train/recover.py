"""``train.Finetune``: recovery fine-tuning as a pipeline step, so recipes and the optimizer can use it.

After pruning or factorizing, a few hundred steps on the task's training data win back most of
the lost quality. Zeros already in the weights (unstructured / N:M pruning) stay zeros while
training — otherwise the optimizer would quietly undo the sparsity the pipeline paid for.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch.nn as nn

from slimkit.config import BaseConfig, register, register_handler
from slimkit.errors import SlimkitError

#: Fraction of exact zeros above which a model counts as sparse and its zeros are kept while training.
SPARSE_ENOUGH = 0.01


@register("train.Finetune")
@dataclasses.dataclass(frozen=True)
class Finetune(BaseConfig):
    """Fine-tune on the task's training data for ``steps`` AdamW steps (warmup + cosine)."""

    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SlimkitError(f"Finetune steps={self.steps!r} is invalid", "use a positive whole number of steps")
        if not self.lr > 0:
            raise SlimkitError(f"Finetune lr={self.lr!r} is invalid", "use a positive learning rate, e.g. 1e-3")


def _finetune(model: nn.Module, config: Finetune, task: Any) -> nn.Module:
    from slimkit.prune.masks import PRUNABLE, masked
    from slimkit.train.finetune import finetune

    if task is None or not task.train or task.loss is None:
        raise SlimkitError(f"Finetune needs a task with training data and a loss (got {getattr(task, 'name', None)!r})",
                           "give the Task train batches and a loss, or drop the Finetune step")
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE) and m.weight.is_floating_point()]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)
    keep_zeros = masked(model) if zeros > SPARSE_ENOUGH else contextlib.nullcontext(None)
    with keep_zeros as after_step:
        finetune(model, task, steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                 seed=config.seed, after_step=after_step, progress=False)
    model.eval()
    return model


register_handler(Finetune, _finetune)
