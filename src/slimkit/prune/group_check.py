"""Checks a channel-pruning step runs after every group it removes, before the group is kept.

The forward pass must still run with the original output shapes, and the physically pruned model
must equal the original with the same channels masked (zeroed at the outputs of the layers that lost
them) on a calibration batch. When they differ the graph changed the layout between layers (a
permute or transpose before a flatten, as face detectors do) and the group is restored with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.task import Task
from slimkit.measure._call import tensors

#: Relative output difference above which a pruned model is not the original with those channels masked.
VERIFY_TOLERANCE = 1e-3
#: Channel-preserving layers: a removed channel is removed from their output whatever handler touches them.
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)
#: Layers where removing channels is not masking them (they normalise or mix across the channels).
_NOT_MASKABLE = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MultiheadAttention)


class GroupCheck:
    """The original with the channels removed so far masked, compared with the pruned model after each group."""

    def __init__(self, model: nn.Module, inputs: tuple) -> None:
        self.original, self.inputs = copy.deepcopy(model).eval(), inputs
        self.removed: dict[str, set[int]] = {}   # layer -> original output channels removed so far
        self.kept: dict[str, list[int]] = {}     # layer -> original output channels still there

    def remove(self, group: Any, names: dict[int, str], graph: Any) -> None:
        for dep, idxs in group:
            module = dep.target.module
            out = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and graph.is_out_channel_pruning_fn(dep.handler)
            if not (out or isinstance(module, _PER_CHANNEL)) or isinstance(module, nn.PReLU) and module.num_parameters == 1:
                continue
            name = names.get(id(module), "?")
            width = module.weight.shape[0] if getattr(module, "weight", None) is not None else module.num_features
            current = self.kept.get(name, list(range(width)))
            drop = {int(i) for i in idxs}
            self.removed.setdefault(name, set()).update(c for j, c in enumerate(current) if j in drop)
            self.kept[name] = [c for j, c in enumerate(current) if j not in drop]

    def check(self, model: nn.Module, group: Any) -> str:
        """Empty when the pruned model equals the masked original. A group that masking cannot stand for
        (it normalises or mixes across the channels) is kept unchecked, and later groups are checked
        against the model as pruned so far."""
        if any(isinstance(dep.target.module, (_NOT_MASKABLE, nn.Parameter)) for dep, _ in group):
            self.original, self.removed, self.kept = copy.deepcopy(model).eval(), {}, {}
            return ""
        hooks = [self.original.get_submodule(n).register_forward_hook(_zeroing(sorted(c)))
                 for n, c in self.removed.items() if c]
        try:
            with torch.no_grad():
                masked = [t.float() for t in tensors(self.original(*self.inputs))]
                pruned = [t.float() for t in tensors(model(*self.inputs))]
        finally:
            for h in hooks:
                h.remove()
        for a, b in zip(pruned, masked):
            scale = float(b.abs().max()) or 1.0
            diff = float((a - b).abs().max()) / scale
            if diff > VERIFY_TOLERANCE:
                return (f"the pruned model is not the original with these channels masked (relative difference "
                        f"{diff:.2g}): the layout changes between layers (a permute or transpose before a flatten?)")
        return ""


def _zeroing(channels: list[int]) -> Any:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        dim = output.dim() - 1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
        return output.index_fill(dim, torch.tensor(channels, device=output.device), 0.0)
    return hook


def check_inputs(task: Task | None, example: tuple) -> tuple:
    calib = list(getattr(task, "calib", None) or ())
    return tuple(calib[0]) if calib else example


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__


def runs_as_before(model: nn.Module, example: tuple, reference: list[tuple[int, ...]]) -> str:
    """Empty when the forward pass still runs and gives the original output shapes."""
    try:
        with torch.no_grad():
            now = shapes(model(*example))
    except Exception as exc:  # noqa: BLE001 - any failure means this group cannot be pruned
        return f"pruning this group breaks the forward pass ({first_line(exc)})"
    if now != reference:
        return f"pruning this group breaks the forward pass (output shapes changed from {reference} to {now})"
    return ""


def shapes(output: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors(output)]
