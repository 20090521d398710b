"""What ONNX Runtime really runs: the op of each planned layer in the optimized graph, whether its
outputs are torch's, and the output ranges that let a conv fuse into an integer kernel."""

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
               "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM",
               "MatMulNBits"}  # weight-only: integer weights, float activations
_FLOAT_OPS = {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "LSTM", "GRU"}
_RECURRENT_OPS = {"LSTM", "GRU", "DynamicQuantizeLSTM"}

#: A float graph runs torch's float math in another order: fp32 rounding is ~1e-6 of the output's
#: scale, so a larger error means the graph is not the model (a branch baked in, an op exported wrong).
FLOAT_MAX_REL_ERROR = 1e-3
FLOAT_MIN_COSINE = 0.9999
#: A quantized graph against the model it was exported from (the float model carrying the
#: dequantized weights): only ORT's activation rounding separates them. Measured on the example
#: (cosine of the whole output): MiniLM static int8 0.9835, dynamic 0.9935, the test table's models
#: >= 0.999; a branch baked in or an output computed wrong lands far below. Not against the quantized
#: torch model: torch's dynamic int8 rounds otherwise and, on MiniLM, is itself 0.955 from ORT.
INT8_MIN_COSINE = 0.95


def layer_kernels(nodes: list[tuple[str, str, list[str]]], modules: list[str]) -> dict[str, str]:
    """Planned module -> the op ORT's optimized graph runs it with (an integer op wins over a float one).

    A node is the module's by its exporter-scoped name, or by the int8 weight slimkit wrote for it
    (``<weight>_int8_<node name>``), which a fused node reads. A recurrent layer's LSTM / GRU node
    runs every gate matrix planned under it (``lstm`` runs ``lstm.gates.ih_l0``)."""
    wanted, found = set(modules), {}
    for name, op, inputs in nodes:
        if op not in INTEGER_OPS | _FLOAT_OPS:
            continue
        owners = {module_of(name, wanted)} | {module_of(i.rsplit("_int8_", 1)[1].split("_DQ")[0], wanted)
                                              for i in inputs if "_int8_" in i}
        if op in _RECURRENT_OPS:
            owners |= {m for m in wanted for o in owners if o and m.startswith(o + ".")}
        for module in owners & wanted:
            if found.get(module) not in INTEGER_OPS:
                found[module] = op
    return found


def output_mismatch(reference: list[torch.Tensor], got: list[torch.Tensor], quantized: bool) -> str:
    """Why ``got`` (ORT's outputs) is not ``reference`` (torch's), "" when every output is close.

    Float: max |error| / max |reference| <= ``FLOAT_MAX_REL_ERROR`` and cosine >= ``FLOAT_MIN_COSINE``;
    quantized: cosine >= ``INT8_MIN_COSINE``, a bound int8 noise stays inside and a wrong graph does not.
    """
    if len(got) != len(reference):
        return f"{len(got)} outputs where torch returns {len(reference)}"
    for i, (want, have) in enumerate(zip(reference, got)):
        if tuple(want.shape) != tuple(have.shape):
            return f"output {i} has shape {tuple(have.shape)}, torch's {tuple(want.shape)}"
        a, b = want.detach().double().flatten(), have.detach().double().flatten()  # (N,)
        if not torch.equal(a.isfinite(), b.isfinite()):
            return f"output {i} is not finite where torch's is (or the other way round)"
        a, b = a[a.isfinite()], b[b.isfinite()]
        norms = float(a.norm() * b.norm())
        cos = float(a @ b) / norms if norms else float(torch.equal(a, b))
        rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) if a.numel() else 0.0
        if quantized and cos < INT8_MIN_COSINE:
            return f"output {i} has cosine {cos:.4f} to torch's (int8 stays >= {INT8_MIN_COSINE})"
        if not quantized and (rel > FLOAT_MAX_REL_ERROR or cos < FLOAT_MIN_COSINE):
            return (f"output {i} differs by {rel:.2g} of its largest value, cosine {cos:.6f} "
                    f"(float allows {FLOAT_MAX_REL_ERROR:g}, {FLOAT_MIN_COSINE})")
    return ""


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
