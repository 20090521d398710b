"""NAS as a pipeline stage: the optimizer's trial picks an architecture of the model's own CNN family.

The config ``nas.CNN`` names one architecture; its handler builds it and trains it on the task,
distilling from the model it replaces (the trained original is the best teacher at hand). This
module also registers fusion (``slimkit.architecture.space``), which the optimizer reaches
through the same module list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import slimkit.architecture.space  # noqa: F401  (registers the "fuse" technique)
from slimkit.config import BaseConfig, register, register_handler
from slimkit.errors import SlimkitError
from slimkit.nas.cnn import CNNArch, CNNSpace, arch_of, build
from slimkit.search.space import SearchContext, register_technique


@register("nas.CNN")
@dataclasses.dataclass(frozen=True)
class CNN(BaseConfig):
    """Replace the model by the CNN with these stages, trained ``steps`` steps (KD weight ``distill``)."""

    version: ClassVar[int] = 1
    widths: tuple[int, ...] = (8, 16, 32)  # defaults: half the zoo mnist CNN's widths
    depths: tuple[int, ...] = (1, 1, 1)
    kernels: tuple[int, ...] = (3, 3, 3)
    hidden: int = 64
    steps: int = 500
    lr: float = 3e-3
    distill: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.widths or not len(self.widths) == len(self.depths) == len(self.kernels):
            raise SlimkitError(f"nas.CNN needs one width, depth and kernel per stage, got {self.widths}, "
                               f"{self.depths}, {self.kernels}", "give e.g. widths=[8, 16, 32], depths=[1, 1, 1], kernels=[3, 3, 3]")
        if self.steps < 1 or not 0.0 <= self.distill <= 1.0:
            raise SlimkitError(f"nas.CNN steps={self.steps}, distill={self.distill}", "steps >= 1, distill in [0, 1]")

    def arch(self, like: CNNArch) -> CNNArch:
        """This architecture with the input/output shape of ``like``."""
        return dataclasses.replace(like, widths=self.widths, depths=self.depths, kernels=self.kernels, hidden=self.hidden)


def build_and_train(model: nn.Module, config: CNN, task: Any) -> nn.Module:
    """Handler of :class:`CNN`: the new architecture, trained on ``task.train`` with KD from ``model``."""
    from slimkit.train import finetune

    arch = config.arch(arch_of(model, task.example))
    torch.manual_seed(config.seed)
    student = build(arch)
    teacher = model.eval().requires_grad_(False)

    def loss(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        out = m(*inputs)
        with torch.no_grad():
            soft = F.softmax(teacher(*inputs), -1)
        kd = F.kl_div(F.log_softmax(out, -1), soft, reduction="batchmean")
        return (1 - config.distill) * F.cross_entropy(out, labels) + config.distill * kd

    finetune(student, task, steps=config.steps, lr=config.lr, loss=loss, seed=config.seed, progress=False,
             label=f"training NAS candidate {arch.widths}")
    return student.eval()


register_handler(CNN, build_and_train)


def suggest(trial: Any, ctx: SearchContext) -> CNN:
    """Width, depth and kernel per stage and the head width, around the task model's own stages."""
    space = CNNSpace.from_model(ctx.task.model, ctx.task.example)
    arch = space.suggest(trial, prefix="nas")
    return CNN(widths=arch.widths, depths=arch.depths, kernels=arch.kernels, hidden=arch.hidden,
               steps=int(ctx.extra.get("nas_steps", 500)))


def applies(ctx: SearchContext) -> bool:
    """Needs training data and a model of the supported CNN family."""
    if not ctx.trainable:
        return False
    try:
        arch_of(ctx.task.model, ctx.task.example)
    except SlimkitError:
        return False
    return True


register_technique("nas", "nas", suggest, applies)
