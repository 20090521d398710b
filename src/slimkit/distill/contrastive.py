"""Plain fine-tuning for an encoder without labels: unsupervised SimCSE on the task's own text.

Distillation has to beat *plain fine-tuning of the same student with the same budget*. A sentence
encoder task like ``minilm`` has training sentences but no labels, so the label-based loss does not
exist; the standard teacher-free training signal for sentence embeddings on raw text is
unsupervised SimCSE (Gao et al., 2021): encode each sentence twice with dropout on, and train each
embedding to pick its own twin out of the batch (InfoNCE over cosine similarities / ``temperature``).
Same loop, steps, lr, batches and seed as ``Distill`` — only the teacher is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.core.task import Task
from slimkit.distill.distiller import _first
from slimkit.measure._call import pinned_threads
from slimkit.train.finetune import TrainResult, finetune
from slimkit.train.recover import TrainRecord, training_report_section


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE: row i of ``first`` (B, D) must match row i of ``second`` (B, D) among all B rows."""
    a, b = F.normalize(first.flatten(1), dim=-1), F.normalize(second.flatten(1), dim=-1)
    logits = a @ b.T / temperature                                 # (B, B) cosine / τ
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


class SimCSELoss:
    """``loss(model, inputs, labels)`` for ``finetune``: two dropout views of the same batch."""

    def __init__(self, temperature: float = 0.05) -> None:
        if not temperature > 0:
            raise SlimkitError(f"temperature={temperature!r} is invalid", "use a positive temperature, e.g. 0.05")
        self.temperature = temperature

    def __call__(self, model: nn.Module, inputs: tuple[Any, ...], labels: Any) -> torch.Tensor:
        first, second = _first(model(*inputs)), _first(model(*inputs))  # (B, D) each, different dropout masks
        return contrastive_loss(first, second, self.temperature)


def simcse_finetune(model: nn.Module, task: Task, *, steps: int, lr: float, seed: int = 0, temperature: float = 0.05,
                    progress: bool = True, threads: int | None = None) -> TrainResult:
    """Fine-tune ``model`` in place on ``task.train`` inputs with the SimCSE loss (no teacher, no labels)."""

    if task is None or not task.train:
        raise SlimkitError(f"SimCSE fine-tuning needs a task with training inputs (got {getattr(task, 'name', None)!r})",
                           "give the Task train batches")
    if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        raise SlimkitError("SimCSE fine-tuning needs dropout in the model: two passes would be identical",
                           "use a model with dropout layers (e.g. a transformer encoder)")
    with pinned_threads(threads):
        result = finetune(model, task, steps=steps, lr=lr, seed=seed, loss=SimCSELoss(temperature),
                          progress=progress, label=f"SimCSE fine-tuning {task.name}")
    model.eval()
    return result


@technique("distill.SimCSE", stage="recover")
@dataclasses.dataclass(frozen=True)
class SimCSE(BaseConfig):
    """Label-free fine-tuning of an encoder with unsupervised SimCSE for ``steps`` steps (no teacher)."""

    steps: int = 200
    lr: float = 3e-5
    temperature: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise SlimkitError(f"distill.SimCSE steps={self.steps!r} is invalid", "use a positive number of steps")
        if not self.lr > 0 or not self.temperature > 0:
            raise SlimkitError(f"distill.SimCSE lr={self.lr!r}, temperature={self.temperature!r}",
                               "use a positive learning rate and temperature, e.g. 3e-5 and 0.05")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        result = simcse_finetune(model, task, steps=self.steps, lr=self.lr, seed=self.seed,
                                 temperature=self.temperature, progress=False)
        add_record(model, TrainRecord.of(self, result))
        return model

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        training_report_section(report, record)

