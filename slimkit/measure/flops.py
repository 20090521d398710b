"""Multiply-accumulates (MACs) of one forward pass, in total and per module.

Counting is done by torch's own ``FlopCounterMode``, which sees every matmul, convolution and
attention kernel at the aten level, so functional calls inside ``forward`` are counted too.
It reports FLOPs (2 per MAC); we keep both. Elementwise ops (activations, norms, adds) are not
counted: they are memory-bound and negligible next to the matmuls.

Quantized kernels (``quantized::linear``, packed int8 convs) are invisible to ``FlopCounterMode``;
for a leaf module it reports zero for that still looks like a Linear or a Conv, we derive the MACs
from its shapes and say so in ``shape_derived``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn as nn

from slimkit.measure._call import Example, device_for, leaf_modules, prepared


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """MACs of one forward pass. ``flops == 2 * macs``."""

    macs: int
    flops: int
    by_module: dict[str, int]  # MACs per module (children included); "" is the whole model
    by_leaf: dict[str, int]  # MACs per leaf module, every leaf listed
    shape_derived: tuple[str, ...] = ()  # leaves whose MACs come from shapes, not FlopCounterMode

    @property
    def outside_leaves(self) -> int:
        """MACs done by non-leaf modules' own code (e.g. attention matmuls written in ``forward``)."""
        return max(self.macs - sum(self.by_leaf.values()), 0)


def count_flops(model: nn.Module, example: Example, device: str | torch.device | None = None) -> FlopCount:
    """Count the MACs of ``model(*example)`` (or ``model(**example)`` for a dict) on ``device``."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = device_for(model, device)
    leaves = leaf_modules(model)
    derived: dict[str, int] = {}
    hooks = [mod.register_forward_hook(_shape_macs_hook(name, derived)) for name, mod in leaves]
    try:
        with prepared(model, example, dev) as (args, kwargs):
            counter = FlopCounterMode(display=False)
            with counter, torch.inference_mode():
                model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()

    total_flops = int(counter.get_total_flops())
    root = type(model).__name__
    by_module: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        if key == root:
            name = ""
        elif key.startswith(root + "."):
            name = key[len(root) + 1:]
        else:  # "Global" and anything not under the model
            continue
        by_module[name] = int(sum(per_op.values())) // 2

    macs = total_flops // 2
    by_leaf = {name: by_module.get(name, 0) for name, _ in leaves}
    shape_derived = []
    for name, extra in derived.items():
        if by_leaf.get(name, 0) == 0 and extra > 0:
            shape_derived.append(name)
            by_leaf[name] = extra
            macs += extra
            for ancestor in _ancestors(name):
                by_module[ancestor] = by_module.get(ancestor, 0) + extra
    by_module[""] = macs
    return FlopCount(macs=macs, flops=2 * macs, by_module=by_module, by_leaf=by_leaf,
                     shape_derived=tuple(shape_derived))


def _ancestors(name: str) -> list[str]:
    """``'a.b.c'`` -> ``['', 'a', 'a.b']`` (the module itself is not included)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def _shape_macs_hook(name: str, out: dict[str, int]) -> Any:
    """A forward hook adding the MACs a Linear- or Conv-shaped module must do to ``out[name]``."""

    def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
        macs = _shape_macs(mod, inputs, output)
        if macs:
            out[name] = out.get(name, 0) + macs

    return hook


def _shape_macs(mod: nn.Module, inputs: tuple, output: Any) -> int:
    if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
        return 0
    in_features = getattr(mod, "in_features", None)
    out_features = getattr(mod, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int) and out_features > 0:
        # output (..., out_features): each element is a dot product of length in_features
        return output.numel() * in_features
    in_ch, out_ch = getattr(mod, "in_channels", None), getattr(mod, "out_channels", None)
    kernel, groups = getattr(mod, "kernel_size", None), getattr(mod, "groups", 1)
    if isinstance(in_ch, int) and isinstance(out_ch, int) and kernel is not None and isinstance(groups, int):
        k = math.prod(kernel) if isinstance(kernel, (tuple, list)) else int(kernel)
        if getattr(mod, "transposed", False):
            # every input element is scattered into out_ch/groups * k outputs
            return inputs[0].numel() * (out_ch // groups) * k
        # output (N, out_ch, *spatial): each element sums in_ch/groups * k products
        return output.numel() * (in_ch // groups) * k
    return 0
