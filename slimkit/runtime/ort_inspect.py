"""What ONNX Runtime really runs: the op of each planned layer in the optimized graph, and the
output ranges that let a conv fuse into an integer kernel."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from slimkit.runtime.onnx_export import module_of


class Kernels(Counter):
    """Op types of the optimized graph (a Counter), with its nodes as (name, op type, inputs)."""

    nodes: list[tuple[str, str, list[str]]] = []


#: Ops that compute in integers (the fused forms of Q/DQ around a Conv / MatMul / Gemm).
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM"}
_FLOAT_OPS = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}


def layer_kernels(nodes: list[tuple[str, str, list[str]]], modules: list[str]) -> dict[str, str]:
    """Planned module -> the op ORT's optimized graph runs it with (an integer op wins over a float one).

    A node is the module's by its exporter-scoped name, or by the int8 weight slimkit wrote for it
    (``<weight>_int8_<node name>``), which a fused node reads."""
    wanted, found = set(modules), {}
    for name, op, inputs in nodes:
        if op not in INTEGER_OPS | _FLOAT_OPS:
            continue
        owners = {module_of(name, wanted)} | {module_of(i.rsplit("_int8_", 1)[1].split("_DQ")[0], wanted)
                                              for i in inputs if "_int8_" in i}
        for module in owners & wanted:
            if found.get(module) not in INTEGER_OPS:
                found[module] = op
    return found


def output_ranges(model: nn.Module, example: tuple[torch.Tensor, ...], names: list[str]) -> dict[str, tuple[float, float]]:
    """(min, max) of each named module's output on ``example``."""
    seen: dict[str, tuple[float, float]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.numel():
                lo, hi = seen.get(name, (math.inf, -math.inf))
                seen[name] = (min(lo, float(output.min())), max(hi, float(output.max())))
        return record

    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(hook(n)) for n in names if n in modules]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return seen
