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

from slimkit.config import BaseConfig, register, register_handler
from slimkit.errors import SlimkitError
from slimkit.io import build_registered, builder_of, register_builder
from slimkit.architecture.routing import Routed, calibrate, confidence


#: What flows between blocks: one tensor (a CNN's features) or a tuple whose every tensor has the
#: samples on dim 0 (a transformer's hidden states and attention mask).
State = torch.Tensor | tuple[torch.Tensor, ...]


def _rows_of(x: State) -> int:
    return (x[0] if isinstance(x, tuple) else x).shape[0]


def _take(x: State, keep: torch.Tensor) -> State:
    """The rows ``keep`` (a (B,) bool mask) of every tensor of the state."""
    return tuple(t[keep] for t in x) if isinstance(x, tuple) else x[keep]


class EarlyExit(Routed):
    """``blocks[i]`` then ``heads[i]`` for every early exit; the last block ends in the model's own head."""

    def __init__(self, blocks: Sequence[nn.Module], heads: Sequence[nn.Module], freeze_backbone: bool = True) -> None:
        if len(heads) != len(blocks) - 1 or not heads:
            raise SlimkitError(f"{len(blocks)} blocks need {len(blocks) - 1} exit heads, got {len(heads)}",
                               "split the model into at least two blocks")
        super().__init__(len(blocks))
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.freeze_backbone = freeze_backbone
        for p in self.blocks.parameters():
            p.requires_grad_(not freeze_backbone)

    def train(self, mode: bool = True) -> "EarlyExit":
        super().train(mode)
        if self.freeze_backbone:
            self.blocks.eval()  # a frozen backbone keeps its BatchNorm statistics too
        return self

    def exit_logits(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit for every sample (training, calibration)."""
        x: State = inputs[0] if len(inputs) == 1 else inputs
        out = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            out.append(self.heads[i](x) if i < len(self.heads) else x)
        return out

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x: State = inputs[0] if len(inputs) == 1 else inputs  # a CNN's image, an encoder's (ids, mask)
        batch = _rows_of(x)
        rows = torch.arange(batch)  # which original samples are still running
        exits = torch.full((batch,), len(self.heads), dtype=torch.long)
        out: torch.Tensor | None = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == len(self.heads):  # the final exit takes every remaining sample
                out = x if out is None else out.index_copy(0, rows, x)
                break
            threshold = float(self.thresholds[i])
            if threshold >= 1.0:
                continue  # this exit can never fire: skip its head entirely
            logits = self.heads[i](x)  # (b, classes)
            leave = confidence(logits) > threshold
            if not bool(leave.any()):
                continue
            if out is None:
                out = logits.new_empty((batch,) + tuple(logits.shape[1:]))
            out[rows[leave]] = logits[leave]
            exits[rows[leave]] = i
            stay = ~leave
            rows, x = rows[stay], _take(x, stay)
            if rows.numel() == 0:
                break
        self.last_exits = exits
        return out


def exit_head(features: torch.Tensor, classes: int, hidden: int = 64, pool: int = 4) -> nn.Module:
    """A small head for features of shape (B, C, H, W), (B, T, C) or (B, F); ``hidden=0``: one Linear.

    Image features are average-pooled with a fixed kernel (``side // pool``) rather than an adaptive
    pool: the ONNX exporter refuses adaptive pools whose output does not divide the input (14 -> 4).
    """
    if features.dim() == 4:
        c, side = features.shape[1], min(features.shape[-2:])
        k = max(1, side // pool)
        flat = c * (features.shape[-2] // k) * (features.shape[-1] // k)
        return nn.Sequential(nn.AvgPool2d(k), nn.Flatten(), *_mlp(flat, classes, hidden))  # (B, C, H, W) -> (B, classes)
    if features.dim() == 3:
        return nn.Sequential(_MeanTokens(), *_mlp(features.shape[-1], classes, hidden))
    if features.dim() == 2:
        return nn.Sequential(*_mlp(features.shape[-1], classes, hidden))
    raise SlimkitError(f"cannot attach an exit to features of shape {tuple(features.shape)}",
                       "exit after a block that outputs (B, C, H, W), (B, T, C) or (B, F)")


def _mlp(fan_in: int, classes: int, hidden: int) -> list[nn.Module]:
    if not hidden:
        return [nn.Linear(fan_in, classes)]
    return [nn.Linear(fan_in, hidden), nn.ReLU(), nn.Linear(hidden, classes)]


class _MeanTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, C)
        return x.mean(1)


def default_exits(model: nn.Sequential) -> list[int]:
    """Indices to exit after: every pooling layer of a CNN except the last one."""
    pools = [i for i, m in enumerate(model) if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    return pools[:-1]


def attach_exits(model: nn.Module, example: tuple[torch.Tensor, ...] | torch.Tensor, after: Sequence[int] = (),
                 *, hidden: int = 64, freeze_backbone: bool = True, seed: int = 0) -> EarlyExit:
    """Split a ``nn.Sequential`` after the modules at ``after`` (default: every pooling but the last),
    or an :class:`~slimkit.architecture.encoder_exit.EncoderClassifier` after those encoder layers."""
    from slimkit.architecture.encoder_exit import EncoderClassifier, attach_encoder_exits

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


@register_builder("early_exit")
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


@register("architecture.EarlyExit")
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


def early_exit(model: nn.Module, config: EarlyExitConfig, task: Any) -> EarlyExit:
    """Handler: attach, train on ``task.train`` minus ``holdout`` batches, calibrate on those."""
    from slimkit.train import finetune

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
    return ee.eval()


register_handler(EarlyExitConfig, early_exit)
