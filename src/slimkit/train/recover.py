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

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.train.finetune import TrainResult, finetune
from slimkit.train.masks import PRUNABLE, masked

#: Fraction of exact zeros above which a model counts as sparse and its zeros are kept while training.
SPARSE_ENOUGH = 0.01
#: Fine-tuning lengths the search offers (``ctx.extra["finetune_steps"]`` overrides); informed guesses take the third.
FINETUNE_STEPS = (100, 200, 400, 800)


@technique("train.Finetune", stage="recover", search="finetune")
@dataclasses.dataclass(frozen=True)
class Finetune(BaseConfig):
    """Fine-tune on the task's training data for ``steps`` AdamW steps (warmup + cosine).

    ``evals``: score the model this many times along the way and end with the best-scoring weights
    (0: no evaluation, the last weights). ``recompute``: recompute the repeated blocks' activations
    in the backward pass (less memory, about one more forward per step; ``train.recompute``).
    """

    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0
    evals: int = 0
    recompute: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SlimkitError(f"Finetune steps={self.steps!r} is invalid", "use a positive whole number of steps")
        if not self.lr > 0:
            raise SlimkitError(f"Finetune lr={self.lr!r} is invalid", "use a positive learning rate, e.g. 1e-3")
        if not isinstance(self.evals, int) or self.evals < 0:
            raise SlimkitError(f"Finetune evals={self.evals!r} is invalid", "use 0 (no evaluation) or more")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return recover(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Finetune:
        lr = float(ctx.extra.get("finetune_lr", 1e-3))
        steps = ctx.extra.get("finetune_steps", FINETUNE_STEPS)
        return cls(steps=int(trial.suggest_categorical("finetune.steps", list(steps))), lr=lr)

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        return ctx.trainable

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        training_report_section(report, record)


@dataclasses.dataclass
class TrainRecord(StepRecord):
    """A training step (fine-tuning, distillation): its length, losses, evaluations and time."""

    steps: int = 0
    first_loss: float = 0.0
    last_loss: float = 0.0
    evals: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    best_step: int | None = None
    seconds: float = 0.0

    @classmethod
    def of(cls, config: BaseConfig, result: TrainResult) -> TrainRecord:
        return cls(config.type_name, config.to_dict(), steps=result.steps,
                   first_loss=result.losses[0] if result.losses else 0.0,
                   last_loss=result.losses[-1] if result.losses else 0.0, evals=list(result.evals),
                   best_step=result.best_step, seconds=result.seconds)


def training_report_section(report: ReportSection, record: StepRecord) -> None:
    if isinstance(record, TrainRecord):
        best = f", best weights from step {record.best_step}" if record.best_step is not None else ""
        report.note(f"{record.technique}: {record.steps} steps, loss {record.first_loss:.4g} -> {record.last_loss:.4g}"
                    f"{best}, {record.seconds:.1f} s")


def recover(model: nn.Module, config: Finetune, task: Task | None) -> nn.Module:
    """Handler of :class:`Finetune`: train in place, zeros kept when the model is sparse."""
    if task is None or not task.train or task.loss is None:
        raise SlimkitError(f"Finetune needs a task with training data and a loss (got {getattr(task, 'name', None)!r})",
                           "give the Task train batches and a loss, or drop the Finetune step")
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE) and m.weight.is_floating_point()]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)
    keep_zeros = masked(model) if zeros > SPARSE_ENOUGH else contextlib.nullcontext(None)
    with keep_zeros as after_step:
        result = finetune(model, task, steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                 seed=config.seed, after_step=after_step, eval_every=max(1, config.steps // config.evals)
                 if config.evals else 0, restore_best=bool(config.evals), progress=False,
                 recompute=config.recompute)
    add_record(model, TrainRecord.of(config, result))
    model.eval()
    return model

