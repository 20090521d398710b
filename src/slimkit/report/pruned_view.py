"""What pruning left of each layer, read from the models themselves: output width before and after,
and the share of zero weights.

A pruning step's own report section shows this when its record reaches the report; this view is
computed from the original and the final model, so a run that pruned (channels, heads, weights)
always shows its widths and sparsity, whichever path built the report.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.record import records_of
from slimkit.core.registry import technique_named

#: Below this share of zero weights a layer does not count as sparsified (float weights are rarely exactly 0).
MIN_SPARSITY = 0.01


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One weighted layer: output width (channels / neurons) before and after, and its share of zero weights."""

    name: str
    kind: str
    width_before: int
    width_after: int
    sparsity: float

    @property
    def kept(self) -> float:
        return self.width_after / self.width_before if self.width_before else 1.0


def layer_types(*models: nn.Module | None) -> dict[str, str]:
    """Module name -> class name, the first model naming a module winning (the original's types first)."""
    types: dict[str, str] = {}
    for model in models:
        if model is None:
            continue
        for name, module in model.named_modules():
            if name:
                types.setdefault(name, type(module).__name__)
    return types


def pruned_layers(before: nn.Module, after: nn.Module) -> list[LayerShape]:
    """Layers of ``after`` narrower than in ``before`` or with at least ``MIN_SPARSITY`` zero weights; none
    unless pruning ran: a prune-stage step in ``after``'s records, or, for a model that carries no records,
    a narrower layer. (Rounding to a few bits also zeroes small weights; a distilled student is narrower.)"""
    stages = _stages(after)
    rows = _shapes(before, after)
    if "prune" in stages or (not stages and any(r.width_after < r.width_before for r in rows)):
        return rows
    return []


def _stages(model: nn.Module) -> set[str]:
    stages = set()
    for record in records_of(model):
        try:
            stages.add(technique_named(record.technique).stage)
        except SlimkitError:  # a record of a technique this process does not know
            stages.add("unknown")
    return stages


def _shapes(before: nn.Module, after: nn.Module) -> list[LayerShape]:
    originals = dict(before.named_modules())
    rows = []
    for name, module in after.named_modules():
        width = _width(module)
        if width is None or name not in originals:
            continue
        width_before = _width(originals[name]) or width
        weight = getattr(module, "weight", None)
        sparsity = (float((weight == 0).float().mean()) if isinstance(weight, torch.Tensor)
                    and weight.is_floating_point() and weight.numel() else 0.0)
        if width < width_before or sparsity >= MIN_SPARSITY:
            rows.append(LayerShape(name, type(originals[name]).__name__, width_before, width, sparsity))
    return rows


def widths_figure(rows: list[LayerShape], plt: Any) -> Any:
    """Horizontal bars per layer: share of output width kept, and share of weights that are zero."""
    labels = [f"{r.name} ({r.kind})" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.4))
    ys = range(len(rows))
    ax.barh([y - 0.2 for y in ys], [r.kept for r in rows], height=0.4, label="output width kept (after / before)")
    ax.barh([y + 0.2 for y in ys], [r.sparsity for r in rows], height=0.4, label="weights that are zero")
    ax.set_yticks(list(ys), labels=labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.05)
    ax.set_xlabel("share (0 to 1)")
    ax.set_title("what pruning left of each layer")
    ax.legend(fontsize=8, loc="lower right")
    return fig


def _width(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None
