"""The early-exit model: a backbone cut into blocks with a classifier head after some of them.

Routing is per sample inside a batch: after each exit only the not-yet-confident rows go on.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from slimkit.architecture.routing import Routed, confidence
from slimkit.core.errors import SlimkitError

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
