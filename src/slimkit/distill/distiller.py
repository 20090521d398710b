"""``distill.Distill``: train a student against a frozen teacher with the shared fine-tuning loop.

The loss per batch (``alpha`` weighs response KD against the hard labels when the task has them):

    alpha · response + (1 − alpha) · task.loss(student, labels)
    + feature_weight · mean over pairs of feature_kd(proj(student layer), teacher layer)
    + relational · relational_kd(student output, teacher output)

``response`` is ``logit_kd`` at ``temperature`` for classifiers and ``embedding_kd`` for encoders
(``output="auto"`` decides by whether training batches carry labels). The teacher runs in eval
mode without gradients; projections are trained with the student and then dropped (the student
keeps its own structure). The config holds only plain values: ``teacher="task"`` is the task's
original model, any other string is the path of a saved artifact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.distill.features import FeatureTaps, projection
from slimkit.distill.losses import embedding_kd, feature_kd, logit_kd, relational_kd
from slimkit.io import load
from slimkit.measure._call import pinned_threads
from slimkit.train.finetune import TrainResult, finetune
from slimkit.train.masks import PRUNABLE, masked
from slimkit.train.recover import SPARSE_ENOUGH, TrainRecord, training_report_section

OUTPUTS = ("auto", "logits", "embedding")
#: Step budgets the search chooses between; short, since every trial pays for them.
SEARCH_STEPS = (100, 200, 400)


@technique("distill.Distill", stage="recover", search="distill")
@dataclasses.dataclass(frozen=True)
class Distill(BaseConfig):
    """Knowledge distillation from ``teacher`` for ``steps`` AdamW steps at peak ``lr``.

    ``recompute``: the student's repeated blocks recompute their activations in the backward pass
    (less training memory for about one more student forward per step; ``train.recompute``).
    """

    teacher: str = "task"
    temperature: float = 4.0
    alpha: float = 0.5
    features: tuple[tuple[str, str], ...] = ()
    feature_weight: float = 1.0
    relational: float = 0.0
    output: str = "auto"
    steps: int = 200
    lr: float = 1e-3
    seed: int = 0
    recompute: bool = False

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SlimkitError(f"temperature={self.temperature!r} is invalid", "use a positive temperature, e.g. 4.0")
        if not 0.0 <= self.alpha <= 1.0:
            raise SlimkitError(f"alpha={self.alpha!r} is out of range", "use a weight in [0, 1] (1 = KD loss only)")
        if self.feature_weight < 0 or self.relational < 0:
            raise SlimkitError("feature_weight and relational must not be negative", "use 0 to turn a term off")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise SlimkitError(f"steps={self.steps!r} is invalid", "use a positive whole number of steps")
        if not self.lr > 0:
            raise SlimkitError(f"lr={self.lr!r} is invalid", "use a positive learning rate, e.g. 1e-3")
        if self.output not in OUTPUTS:
            raise SlimkitError(f"output={self.output!r} is not supported", f"use one of {', '.join(OUTPUTS)}")
        if any(not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(n, str) for n in p)) for p in self.features):
            raise SlimkitError(f"features={self.features!r} is invalid",
                               "give (student layer, teacher layer) name pairs, e.g. (('4', '4'),)")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        add_record(model, TrainRecord.of(self, distill(model, task, self, progress=False)))
        return model

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        training_report_section(report, record)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Distill:
        """A step budget, the temperature and the KD weight; a small rate for large pre-trained models."""
        steps = trial.suggest_categorical("distill.steps", list(ctx.extra.get("distill_steps", SEARCH_STEPS)))
        temperature = trial.suggest_float("distill.temperature", 1.0, 8.0, log=True)
        alpha = trial.suggest_float("distill.alpha", 0.3, 1.0)
        big = sum(p.numel() for p in ctx.task.model.parameters()) > 5_000_000
        return cls(steps=int(steps), temperature=temperature, alpha=alpha, lr=3e-5 if big else 1e-3)

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        return bool(ctx.trainable)


def teacher_model(config: Distill, task: Task | None, student: nn.Module) -> nn.Module:
    """The frozen teacher: the task's model (a copy if it is the student itself) or a saved artifact."""
    if config.teacher == "task":
        if task is None:
            raise SlimkitError("Distill(teacher='task') needs the task", "pass the task to sk.apply")
        teacher = task.model if task.model is not student else copy.deepcopy(task.model)
    else:
        teacher = load(config.teacher)
    device = next(student.parameters()).device
    return teacher.to(device).eval()  # frozen by running it under no_grad; its flags stay as the caller set them


class DistillLoss:
    """``loss(student, inputs, labels)`` for ``finetune``; ``params`` are the projections to train too."""

    def __init__(self, student: nn.Module, teacher: nn.Module, task: Task, config: Distill) -> None:
        self.teacher, self.task, self.config = teacher, task, config
        pairs = list(config.features)
        self.s_taps = FeatureTaps(student, [s for s, _ in pairs], "student")
        self.t_taps = FeatureTaps(teacher, [t for _, t in pairs], "teacher")
        self.pairs = pairs
        self.projections = nn.ModuleList()
        if pairs:  # one forward pass to learn the feature shapes the projections map between
            inputs = tuple(task.example)
            with self.s_taps, self.t_taps, torch.no_grad():
                was = student.training
                student.eval()
                student(*inputs), teacher(*inputs)
                student.train(was)
            for s, t in pairs:
                self.projections.append(projection(self.s_taps.outputs[s], self.t_taps.outputs[t], (s, t)))

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.projections.parameters())

    @contextlib.contextmanager
    def hooked(self):  # noqa: ANN201
        with self.s_taps, self.t_taps:
            yield self

    def response(self, student_out: torch.Tensor, teacher_out: torch.Tensor, labels: Any) -> torch.Tensor:
        mode = self.config.output
        if mode == "auto":
            mode = "embedding" if labels is None else "logits"
        if mode == "embedding":
            return embedding_kd(student_out, teacher_out)
        return logit_kd(student_out, teacher_out, self.config.temperature)

    def __call__(self, student: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        for p in self.params:  # finetune zeroes the student's grads only
            p.grad = None
        with torch.no_grad():
            t_out = _first(self.teacher(*inputs))
        s_out = _first(student(*inputs))
        c = self.config
        kd = self.response(s_out, t_out, labels)
        hard = labels is not None and self.task.loss is not None and c.output != "embedding"
        total = c.alpha * kd + (1 - c.alpha) * self.task.loss(s_out, labels) if hard else kd
        if self.pairs and c.feature_weight:
            terms = [feature_kd(proj(self.s_taps.outputs[s]), self.t_taps.outputs[t])
                     for proj, (s, t) in zip(self.projections, self.pairs)]
            total = total + c.feature_weight * torch.stack(terms).mean()
        if c.relational:
            total = total + c.relational * relational_kd(s_out, t_out)
        return total


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def distill(student: nn.Module, task: Task | None, config: Distill, *, progress: bool = True, eval_every: int = 0,
            patience: int = 0, threads: int | None = None) -> TrainResult:
    """Distill into ``student`` in place; exact zeros in its weights (a pruned student) stay zero."""
    if task is None or not task.train:
        raise SlimkitError(f"distillation needs a task with training inputs (got {getattr(task, 'name', None)!r})",
                           "give the Task train batches (labels are optional)")
    teacher = teacher_model(config, task, student)
    loss = DistillLoss(student, teacher, task, config)
    weights = [m.weight for m in student.modules() if isinstance(m, PRUNABLE) and m.weight.is_floating_point()]
    zeros = sum(int((w == 0).sum()) for w in weights) / max(sum(w.numel() for w in weights), 1)
    keep_zeros = masked(student) if zeros > SPARSE_ENOUGH else contextlib.nullcontext(None)
    params = [p for p in student.parameters() if p.requires_grad] + loss.params
    with keep_zeros as after_step, loss.hooked(), pinned_threads(threads):
        result = finetune(student, task, steps=config.steps, lr=config.lr, seed=config.seed, loss=loss,
                          params=params, after_step=after_step, progress=progress, eval_every=eval_every,
                          patience=patience, label=f"distilling {task.name}", recompute=config.recompute)
    student.eval()
    return result
