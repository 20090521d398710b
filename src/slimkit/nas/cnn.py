"""The CNN family NAS searches: stages of (Conv-BN-ReLU) x depth + MaxPool, then a one- or two-layer head.

The zoo's mnist CNN is one member (widths 16/32/64, depth 1, kernel 3, hidden 128), so a space is
built around a user's model by reading its stages (:meth:`CNNSpace.from_model`) and varying width
(multipliers of its own widths), depth and kernel per stage and the head's hidden width.
Architectures are plain frozen dataclasses; ``build_cnn`` is a registered builder, so a found
model saves and reloads through ``slimkit.io`` like a zoo model.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import SearchContext, builder
from slimkit.core.task import Task
from slimkit.train.finetune import finetune


@dataclasses.dataclass(frozen=True)
class CNNArch:
    """One member of the family; ``hidden=0`` means a single Linear head."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    hidden: int
    in_channels: int = 1
    classes: int = 10
    input_size: int = 28

    def __post_init__(self) -> None:
        if not len(self.widths) == len(self.depths) == len(self.kernels) or not self.widths:
            raise SlimkitError(f"architecture has {len(self.widths)} widths, {len(self.depths)} depths, "
                               f"{len(self.kernels)} kernels", "give one of each per stage")
        if min(self.widths) < 1 or min(self.depths) < 1 or any(k < 1 or k % 2 == 0 for k in self.kernels):
            raise SlimkitError(f"invalid stage settings {self}", "widths and depths >= 1, odd kernel sizes")
        if self.input_size >> len(self.widths) < 1:
            raise SlimkitError(f"{len(self.widths)} pooling stages shrink a {self.input_size}-pixel input to nothing",
                               "use fewer stages")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def side(self) -> int:
        """Spatial size after the last pooling."""
        return self.input_size >> len(self.widths)

    @property
    def flat(self) -> int:
        return self.widths[-1] * self.side * self.side


@builder("nas_cnn")
def build_cnn(**kwargs: Any) -> nn.Sequential:
    """The ``nn.Sequential`` of an architecture (kwargs as in :meth:`CNNArch.to_dict`)."""
    arch = CNNArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    layers: list[nn.Module] = []
    cin = arch.in_channels
    for width, depth, k in zip(arch.widths, arch.depths, arch.kernels):
        for _ in range(depth):
            layers += [nn.Conv2d(cin, width, k, padding=k // 2), nn.BatchNorm2d(width), nn.ReLU()]  # (B, w, s, s)
            cin = width
        layers.append(nn.MaxPool2d(2))  # (B, w, s/2, s/2)
    layers.append(nn.Flatten())  # (B, w * side * side)
    if arch.hidden:
        layers += [nn.Linear(arch.flat, arch.hidden), nn.ReLU(), nn.Linear(arch.hidden, arch.classes)]
    else:
        layers.append(nn.Linear(arch.flat, arch.classes))
    model = nn.Sequential(*layers)
    model.slimkit_builder = ("nas_cnn", arch.to_dict())
    return model


def build(arch: CNNArch) -> nn.Sequential:
    return build_cnn(**arch.to_dict())


def param_count(arch: CNNArch) -> int:
    """Trainable parameters by formula: conv k*k*cin*cout + cout, BN 2*cout, linears in*out + out."""
    total, cin = 0, arch.in_channels
    for width, depth, k in zip(arch.widths, arch.depths, arch.kernels):
        for _ in range(depth):
            total += k * k * cin * width + width + 2 * width
            cin = width
    if arch.hidden:
        return total + arch.flat * arch.hidden + arch.hidden + arch.hidden * arch.classes + arch.classes
    return total + arch.flat * arch.classes + arch.classes


def arch_of(model: nn.Module, example: tuple[torch.Tensor, ...] | torch.Tensor) -> CNNArch:
    """Read a model of this family back into its architecture (stages split at pooling layers)."""
    x = example[0] if isinstance(example, tuple) else example
    hint = "NAS builds on nn.Sequential CNNs of (Conv2d, BatchNorm2d, ReLU) x depth + MaxPool2d stages and a Linear head"
    if not isinstance(model, nn.Sequential) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise SlimkitError(f"cannot read a CNN search space from {type(model).__name__} on input {tuple(x.shape)}", hint)
    widths, depths, kernels, linears = [], [], [], []
    convs: list[nn.Conv2d] = []
    for m in model:
        if isinstance(m, nn.Conv2d):
            if m.kernel_size[0] != m.kernel_size[1] or m.stride != (1, 1) or m.groups != 1 or linears:
                raise SlimkitError(f"unsupported conv {m}", hint)
            convs.append(m)
        elif isinstance(m, nn.MaxPool2d):
            if not convs or len({c.kernel_size[0] for c in convs}) != 1:
                raise SlimkitError("a pooling stage without convs, or with mixed kernel sizes", hint)
            widths.append(convs[-1].out_channels)
            depths.append(len(convs))
            kernels.append(convs[0].kernel_size[0])
            convs = []
        elif isinstance(m, nn.Linear):
            linears.append(m)
        elif not isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Flatten)):
            raise SlimkitError(f"unsupported layer {type(m).__name__}", hint)
    if convs or not widths or len(linears) not in (1, 2):
        raise SlimkitError("the model does not end in pooled stages and a 1- or 2-layer Linear head", hint)
    return CNNArch(tuple(widths), tuple(depths), tuple(kernels), linears[0].out_features if len(linears) == 2 else 0,
                   in_channels=x.shape[1], classes=linears[-1].out_features, input_size=x.shape[-1])


@dataclasses.dataclass(frozen=True)
class CNNSpace:
    """Choices per stage around ``base``: width multipliers of its widths, depths, kernels; head widths."""

    base: CNNArch
    width_mults: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    depths: tuple[int, ...] = (1, 2)
    kernels: tuple[int, ...] = (3, 5)
    hiddens: tuple[int, ...] = (32, 64, 128)

    @classmethod
    def from_model(cls, model: nn.Module, example: Any, **choices: Any) -> "CNNSpace":
        return cls(arch_of(model, example), **choices)

    @property
    def stages(self) -> int:
        return len(self.base.widths)

    def widths(self, stage: int) -> list[int]:
        return sorted({max(1, round(self.base.widths[stage] * m)) for m in self.width_mults})

    def make(self, widths: Any, depths: Any, kernels: Any, hidden: int) -> CNNArch:
        return dataclasses.replace(self.base, widths=tuple(widths), depths=tuple(depths), kernels=tuple(kernels),
                                   hidden=hidden)

    def largest(self) -> CNNArch:
        n = self.stages
        return self.make([self.widths(s)[-1] for s in range(n)], [max(self.depths)] * n, [max(self.kernels)] * n,
                         max(self.hiddens))

    def smallest(self) -> CNNArch:
        n = self.stages
        return self.make([self.widths(s)[0] for s in range(n)], [min(self.depths)] * n, [min(self.kernels)] * n,
                         min(self.hiddens))

    def suggest(self, trial: Any, prefix: str = "nas") -> CNNArch:
        """The architecture an Optuna trial proposes (parameters ``<prefix>.width0`` ...)."""
        n = self.stages
        return self.make([trial.suggest_categorical(f"{prefix}.width{s}", self.widths(s)) for s in range(n)],
                         [trial.suggest_categorical(f"{prefix}.depth{s}", list(self.depths)) for s in range(n)],
                         [trial.suggest_categorical(f"{prefix}.kernel{s}", list(self.kernels)) for s in range(n)],
                         trial.suggest_categorical(f"{prefix}.hidden", list(self.hiddens)))

    def sample(self, rng: random.Random) -> CNNArch:
        n = self.stages
        return self.make([rng.choice(self.widths(s)) for s in range(n)], [rng.choice(self.depths) for _ in range(n)],
                         [rng.choice(self.kernels) for _ in range(n)], rng.choice(self.hiddens))

    def mutate(self, arch: CNNArch, rng: random.Random, rate: float = 0.3) -> CNNArch:
        """Each gene re-drawn with probability ``rate`` (at least one changes)."""
        genes = [list(arch.widths), list(arch.depths), list(arch.kernels), [arch.hidden]]
        options = [[self.widths(s) for s in range(self.stages)], [list(self.depths)] * self.stages,
                   [list(self.kernels)] * self.stages, [list(self.hiddens)]]
        slots = [(g, i) for g in range(4) for i in range(len(genes[g]))]
        forced = rng.choice(slots)
        for g, i in slots:
            if (g, i) == forced or rng.random() < rate:
                genes[g][i] = rng.choice([o for o in options[g][i] if o != genes[g][i]] or options[g][i])
        return self.make(genes[0], genes[1], genes[2], genes[3][0])

    def contains(self, arch: CNNArch) -> bool:
        return (all(w in self.widths(s) for s, w in enumerate(arch.widths)) and set(arch.depths) <= set(self.depths)
                and set(arch.kernels) <= set(self.kernels) and arch.hidden in self.hiddens)


@technique("nas.CNN", stage="nas", search="nas")
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

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return build_and_train(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> CNN:
        """Width, depth and kernel per stage and the head width, around the task model's own stages."""
        space = CNNSpace.from_model(ctx.task.model, ctx.task.example)
        arch = space.suggest(trial, prefix="nas")
        return cls(widths=arch.widths, depths=arch.depths, kernels=arch.kernels, hidden=arch.hidden,
                   steps=int(ctx.extra.get("nas_steps", 500)))

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        """Needs training data and a model of the supported CNN family."""
        if not ctx.trainable:
            return False
        try:
            arch_of(ctx.task.model, ctx.task.example)
        except SlimkitError:
            return False
        return True


def build_and_train(model: nn.Module, config: CNN, task: Task | None) -> nn.Module:
    """Handler of :class:`CNN`: the new architecture, trained on ``task.train`` with KD from ``model``."""
    if task is None or not task.train:
        raise SlimkitError("nas.CNN trains the new architecture and needs a task with training data",
                           "give the Task train batches")
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

