"""Early exit: small classifier heads after chosen blocks; confident samples stop there.

Easy inputs (most of MNIST) are classified correctly from early features, so running the rest
of the network on them is wasted work. Heads are trained on a frozen backbone (the original
predictions are kept exactly for samples that reach the end) or jointly, optionally distilling
from the final head, and their thresholds are calibrated on held-out data (``routing``). Routing
is per sample inside a batch: after each exit only the not-yet-confident rows go on.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.architecture.encoder_exit import EncoderClassifier, attach_encoder_exits
from slimkit.architecture.exit_model import EarlyExit, default_exits, exit_head
from slimkit.architecture.routing import calibrate
from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import StepRecord, add_record
from slimkit.core.registry import build_registered, builder, builder_of
from slimkit.core.task import Task
from slimkit.train.finetune import finetune


def attach_exits(model: nn.Module, example: tuple[torch.Tensor, ...] | torch.Tensor, after: Sequence[int] = (),
                 *, hidden: int = 64, freeze_backbone: bool = True, seed: int = 0) -> EarlyExit:
    """Split a ``nn.Sequential`` after the modules at ``after`` (default: every pooling but the last),
    or an :class:`~slimkit.architecture.encoder_exit.EncoderClassifier` after those encoder layers."""
    if isinstance(model, EncoderClassifier):  # a transformer: exits after encoder layers, linear heads
        inputs = example if isinstance(example, tuple) else (example,)
        return attach_encoder_exits(model, inputs, after, seed=seed, freeze_backbone=freeze_backbone)
    if not isinstance(model, nn.Sequential):
        raise SlimkitError(f"early exits need an nn.Sequential CNN or an EncoderClassifier, got {type(model).__name__}",
                           "wrap the model's blocks in nn.Sequential or build EarlyExit(blocks, heads) yourself")
    after = sorted(set(after or default_exits(model)))
    if not after or after[0] < 0 or after[-1] >= len(model) - 1:
        raise SlimkitError(f"exit positions {list(after)} do not split a {len(model)}-module model",
                           f"give indices between 0 and {len(model) - 2}")
    example = example[0] if isinstance(example, tuple) else example
    backbone = builder_of(model)
    model = copy.deepcopy(model)  # freezing or joint training must not touch the caller's model
    cuts = [0, *(i + 1 for i in after), len(model)]
    blocks = [nn.Sequential(*model[a:b]) for a, b in zip(cuts, cuts[1:])]
    torch.manual_seed(seed)
    with torch.no_grad():
        x = example
        outputs = []
        for block in blocks:
            x = block.eval()(x)
            outputs.append(x)
        classes = outputs[-1].shape[-1]
        heads = [exit_head(f, classes, hidden) for f in outputs[:-1]]
    ee = EarlyExit(blocks, heads, freeze_backbone=freeze_backbone)
    if backbone is not None:  # saved artifacts rebuild through ``build_early_exit``
        ee.slimkit_builder = ("early_exit", {"backbone": backbone[0], "backbone_kwargs": backbone[1],
                                             "after": list(after), "hidden": hidden, "freeze_backbone": freeze_backbone,
                                             "input_shape": [1, *example.shape[1:]]})
    return ee


@builder("early_exit")
def build_early_exit(backbone: str, backbone_kwargs: dict[str, Any], after: list[int], hidden: int,
                     freeze_backbone: bool, input_shape: list[int]) -> EarlyExit:
    """The untrained early-exit model an artifact names: its backbone's builder, then the same exits.

    ``slimkit.load`` fills in the weights and the calibrated thresholds (a buffer) afterwards.
    """
    example = torch.zeros(input_shape)  # (1, ...) only shapes matter: heads are sized from the block outputs
    return attach_exits(build_registered(backbone, backbone_kwargs, what="early-exit artifact"), example, after,
                        hidden=hidden, freeze_backbone=freeze_backbone)


def exit_loss(distill: float = 0.0, temperature: float = 2.0) -> Any:
    """``loss(model, inputs, labels)`` for :func:`slimkit.train.finetune`: CE at every exit, plus
    ``distill`` x KL to the final head's softened output (self-distillation) at the early ones."""

    def loss(model: EarlyExit, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        logits = model.exit_logits(*inputs)
        final = logits[-1].detach()
        total = F.cross_entropy(logits[-1], labels) if not model.freeze_backbone else logits[-1].new_zeros(())
        for z in logits[:-1]:
            total = total + (1 - distill) * F.cross_entropy(z, labels)
            if distill:
                kd = F.kl_div(F.log_softmax(z / temperature, -1), F.softmax(final / temperature, -1), reduction="batchmean")
                total = total + distill * temperature ** 2 * kd
        return total

    return loss


@technique("architecture.EarlyExit", stage="nas")
@dataclasses.dataclass(frozen=True)
class EarlyExitConfig(BaseConfig):
    """Attach exits ``after`` those module indices, train them ``steps`` steps, calibrate to ``max_drop``.

    ``holdout``: training batches kept out of head training and used for calibration.
    """

    version: ClassVar[int] = 1
    after: tuple[int, ...] = ()
    steps: int = 400
    lr: float = 3e-3
    distill: float = 0.5
    joint: bool = False
    max_drop: float = 0.005
    margin: float = 0.002
    holdout: int = 10
    hidden: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill < 1.0:
            raise SlimkitError(f"distill={self.distill} is outside [0, 1)", "weight of the self-distillation loss")
        if self.steps < 1 or self.holdout < 1:
            raise SlimkitError("steps and holdout must be >= 1", "train the heads and keep batches to calibrate on")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return early_exit(model, self, task)


def early_exit(model: nn.Module, config: EarlyExitConfig, task: Task | None) -> EarlyExit:
    """Handler: attach, train on ``task.train`` minus ``holdout`` batches, calibrate on those."""
    if task is None:
        raise SlimkitError("architecture.EarlyExit trains exit heads and needs a task", "pass the task")
    train = list(getattr(task, "train", None) or [])
    if len(train) <= config.holdout:
        raise SlimkitError(f"task has {len(train)} training batches, {config.holdout} are needed to calibrate",
                           "lower holdout or give the task more training data")
    ee = attach_exits(model, task.example, config.after, hidden=config.hidden, freeze_backbone=not config.joint)
    fit_task = dataclasses.replace(task, model=ee, train=train[:-config.holdout])
    params = ee.heads.parameters() if not config.joint else ee.parameters()
    finetune(ee, fit_task, steps=config.steps, lr=config.lr, loss=exit_loss(config.distill), params=params,
             progress=False, label="training exit heads")
    calibrate(ee, train[-config.holdout:], config.max_drop, config.margin)
    add_record(ee, ExitRecord(config.type_name, config.to_dict(), after=list(config.after),
                              thresholds=[float(t) for t in ee.thresholds]))
    return ee.eval()


@dataclasses.dataclass
class ExitRecord(StepRecord):
    """Where the exits sit and the confidence each needs to answer (calibrated on held-out batches)."""

    after: list[int] = dataclasses.field(default_factory=list)
    thresholds: list[float] = dataclasses.field(default_factory=list)

