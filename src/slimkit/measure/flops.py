"""Multiply-accumulates (MACs) of one forward pass, in total and per module.

Counting is done by torch's own ``FlopCounterMode``, which sees every matmul, convolution and
attention kernel at the aten level, so functional calls inside ``forward`` are counted too.
It reports FLOPs (2 per MAC); we keep both. Elementwise ops (activations, norms, adds) are not
counted: they are memory-bound and negligible next to the matmuls.

Quantized kernels (``quantized::linear``, packed int8 convs) are invisible to ``FlopCounterMode``.
When it reports zero for a leaf module that has a Linear's or a Conv's attributes (``in_features``,
``kernel_size``...), we derive the MACs from its shapes instead and name it in ``shape_derived``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from slimkit.measure._call import Example, device_for, prepared, require_module
from slimkit.measure._trace import Tracer


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """MACs of one forward pass. ``flops == 2 * macs``."""

    macs: int
    flops: int
    by_module: dict[str, int]  # MACs per module (children included); "" is the whole model
    by_leaf: dict[str, int]  # MACs per executed leaf module (see _trace), every leaf listed
    shape_derived: tuple[str, ...] = ()  # leaves whose MACs come from shapes, not FlopCounterMode

    @property
    def outside_leaves(self) -> int:
        """MACs done by non-leaf modules' own code (e.g. attention matmuls written in ``forward``)."""
        return max(self.macs - sum(self.by_leaf.values()), 0)


def count_flops(model: nn.Module, example: Example, device: str | torch.device | None = None) -> FlopCount:
    """Count the MACs of ``model(*example)`` (or ``model(**example)`` for a dict) on ``device``."""

    require_module(model, "count_flops")
    dev = device_for(model, device)
    with prepared(model, example, dev) as (args, kwargs), Tracer(model, dev) as tracer:
        counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        with counter, torch.inference_mode():
            model(*args, **kwargs)

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

    macs = int(counter.get_total_flops()) // 2
    by_leaf = {name: by_module.get(name, 0) for name in tracer.leaves()}
    shape_derived = []
    for name in by_leaf:
        extra = tracer.records[name].shape_macs
        if by_leaf[name] == 0 and extra > 0:  # a kernel FlopCounterMode cannot see
            shape_derived.append(name)
            by_leaf[name] = extra
            macs += extra
            for ancestor in _ancestors(name):
                by_module[ancestor] = by_module.get(ancestor, 0) + extra
    by_module[""] = macs
    return FlopCount(macs=macs, flops=2 * macs, by_module=by_module, by_leaf=by_leaf,
                     shape_derived=tuple(shape_derived))


def _extra_formulas() -> dict[Any, Any]:
    """Formulas torch's registry lacks. ``F.scaled_dot_product_attention`` on CPU runs a kernel that
    ``FlopCounterMode`` does not count (it counts the GPU ones), yet it does the same two matmuls."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _sdpa_flops}


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """FLOPs of attention: scores = q @ k^T, then scores @ v (shapes arrive as FlopCounterMode passes them)."""
    b, h, s_q, d_qk = query_shape  # (B, heads, T_q, D)
    s_k, d_v = key_shape[-2], value_shape[-1]  # k (B, kv_heads, T_k, D), v (B, kv_heads, T_k, D_v)
    return 2 * b * h * s_q * s_k * d_qk + 2 * b * h * s_q * s_k * d_v


def _ancestors(name: str) -> list[str]:
    """``'a.b.c'`` -> ``['', 'a', 'a.b']`` (the module itself is not included)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]
