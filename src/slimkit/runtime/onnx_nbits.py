"""Weight-only layers in ONNX: slimkit's own integers, run by ONNX Runtime without touching activations.

A weight-only model is exported in float (each quantized layer as its dequantized twin), then each
planned node's float weight is swapped for the stored integers:

- Linear (MatMul / Gemm), int4 grouped -> ``com.microsoft.MatMulNBits`` bits=4, block = slimkit's
  group, B = slimkit's packed bytes (element 2j low nibble: the same order), scales as stored.
  slimkit's zero point is a *float* (``-min / scale``); ORT prepacks only integer zero points (a
  float one is dequantized on every call: 10x slower than fp32 on a MiniLM-size stack), so the file
  carries the integer part ``zi = clamp(round(zero), 0, 15)`` as uint8 and the rest as an exact
  float correction ``y += ((x @ G) @ D)`` with ``G`` (K, K/g) the group-sum indicator and ``D``
  (K/g, N) = ``(zi - zero) * scale``: 2/g of the layer's MACs, equal to slimkit's weight up to fp32 rounding.
- Linear, int8 (symmetric, per channel or tensor) -> ``MatMulNBits`` bits=8 with the same integers
  stored as uint8 + 128 (zero point 128). Not ``DequantizeLinear`` + ``MatMul``: ORT's optimizer fuses
  that into an int8-activation kernel (1.6e-2 of the output's scale off on the same stack).
- Conv, int8 (or int4 codes stored per output channel) -> the codes as int8 + ``DequantizeLinear``
  (axis 0) + a float ``Conv``: ORT has no weight-only conv kernel (the reason goes in the sidecar).
- Binary / ternary layers: see ``freeze_bit_layers`` (float, with the reason).

``accuracy_level`` 0 keeps fp32 activations (exact); 4 (int8 activations) was faster at one row but
changes the numbers by ~2e-2 of the output's scale, so it is not used for weight-only layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn as nn

#: MatMulNBits' smallest block; blocks are powers of two.
_MIN_BLOCK = 16
#: int8 rows are one block of at most this many weights (the scale repeated): the MLAS kernels' block sizes.
_INT8_BLOCK = 128
BINARY_REASON = ("{bits}-bit weights: ONNX has no {bits}-bit type and ONNX Runtime no binary / ternary kernel; "
                 "stored unpacked as float32 (the same values), the layer runs as a float {op}")


@dataclasses.dataclass
class PackedWeight:
    """One layer's stored integers, as the ONNX graph takes them (numpy, row n = output channel n)."""

    bits: int                 # 8 (int8 codes) | 4 (packed nibbles, grouped, asymmetric)
    q: np.ndarray             # bits 8: int8 (N, ...) ; bits 4: uint8 (N, K/2)
    scale: np.ndarray         # bits 8: (N,) ; bits 4: (N, K/g)
    zero: np.ndarray | None = None  # bits 4: float (N, K/g)
    group_size: int = 0
    stored_bits: int = 0  # the artifact's width when it differs from ``bits`` (4-bit codes held as int8)

    def describe(self, op: str) -> str:
        if op == "MatMulNBits":
            return (f"MatMulNBits int4 block {self.group_size} (integer zero points + exact float correction)"
                    if self.bits == 4 else "MatMulNBits int8 per channel (uint8 + 128, zero point 128)")
        codes = (" (the 4-bit codes held as int8: ONNX's int4 type needs opset 21, the export is opset 17)"
                 if self.stored_bits == 4 else "")
        return (f"Conv: int8 weights + DequantizeLinear per output channel{codes}, computed in float "
                f"(ONNX Runtime has no weight-only conv kernel; it runs {op})")


def packed_weight(layer: nn.Module) -> PackedWeight | None:
    """The stored integers of a weight-only layer (``QuantLinear`` / ``QuantConv2d`` by their buffers,
    a 4-bit ``BitLinear`` / ``BitConv2d`` as int8 codes), or None when it has no such form."""
    if hasattr(layer, "qweight") and hasattr(layer, "weight_scale"):
        bits = int(getattr(layer, "bits", 8))
        n = layer.qweight.shape[0]
        scale = layer.weight_scale.detach().float()
        if bits == 8:
            return PackedWeight(8, layer.qweight.detach().cpu().numpy(), scale.expand(n).contiguous().numpy())
        if bits == 4 and hasattr(layer, "weight_zero"):
            return PackedWeight(4, layer.qweight.detach().cpu().numpy(), scale.numpy(),
                                layer.weight_zero.detach().float().numpy(), int(layer.group_size))
        return None
    if is_bit_layer(layer) and layer.bits == 4:  # signed codes stored + 8, step per row
        codes = layer.flat_weight() / layer.scale_pos[:, None]  # (N, K) integers in [-8, 7]
        q = torch.round(codes).to(torch.int8).reshape(tuple(getattr(layer, "shape", codes.shape)))
        return PackedWeight(8, q.numpy(), layer.scale_pos.detach().float().numpy(), stored_bits=4)
    return None


def is_bit_layer(m: nn.Module) -> bool:
    """A bit-packed layer (``BitLinear`` / ``BitConv2d``), known by its buffers: runtimes never import techniques."""
    return all(hasattr(m, a) for a in ("packed", "flat_weight", "scale_pos", "bits"))


def freeze_bit_layers(model: nn.Module) -> dict[str, str]:
    """Bit-packed layers (binary, ternary, 4-bit codes) of ``model`` (a copy) made exportable: their
    float weight computed once and held as a constant (the tracer cannot write the unpacking); returns
    each 1-/2-bit layer's reason for being stored as float."""
    reasons = {}
    for name, m in model.named_modules():
        if name and is_bit_layer(m):
            with torch.no_grad():
                frozen = m.flat_weight().detach().clone()  # (N, K)
            m.register_buffer("_frozen_weight", frozen)
            m.flat_weight = lambda m=m: m._frozen_weight  # instance attribute: forward reads it
            if m.bits in (1, 2):
                op = "Conv" if hasattr(m, "shape") else "MatMul"
                reasons[name] = BINARY_REASON.format(bits=m.bits, op=op)
    return reasons


def write_weight_only(graph: Any, planned: dict[str, list[Any]], weights: dict[str, PackedWeight]) -> dict[str, str]:
    """Swap each planned node's float weight for its module's stored integers (the forms in the module
    docstring); returns the modules left float and why. Node names are kept (``layer_kernels`` reads them)."""
    from slimkit.runtime._qdq import replace_nodes

    init = {t.name: t for t in graph.initializer}
    skipped: dict[str, str] = {}
    added: dict[str, tuple[list[Any], list[Any]]] = {}  # node name -> (nodes before it, nodes after it)
    replaced: dict[str, Any] = {}
    for module, nodes in planned.items():
        w = weights[module]
        for node in nodes:
            why = _unsupported(node, init, w)
            if why:
                skipped[module] = why
                break
        else:
            for node in nodes:
                before: list[Any] = []
                after: list[Any] = []
                if node.op_type == "Conv":
                    _dq_conv(graph, node, w, before)
                else:
                    replaced[node.name] = _nbits(graph, node, w, init, after)
                added[node.name] = (before, after)
    if added:
        replace_nodes(graph, [m for n in graph.node for m in ([*added[n.name][0], replaced.get(n.name, n),
                                                                *added[n.name][1]] if n.name in added else [n])])
        _drop_unused(graph)
    return skipped


def _unsupported(node: Any, init: dict[str, Any], w: PackedWeight) -> str:
    from onnx import helper  # optional (onnx, extra 'onnx'): imported when used

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.input[1] not in init:
        return "its weight is computed in the graph, not stored"
    if node.op_type == "Conv":
        if w.bits != 8:
            return "int4 grouped weights on a Conv node"
        return "" if _folded_scale(init[node.input[1]], w) is not None else \
            "its float weight in the graph is not a per-channel multiple of the stored integers"
    if node.op_type not in ("MatMul", "Gemm"):
        return f"no weight-only form for {node.op_type}"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and node.input[2] not in init:
        return "its bias is computed in the graph, not stored"
    plain = not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
    if node.op_type == "Gemm" and not plain:
        return "a Gemm with transA / alpha / beta"
    if w.bits == 4 and (w.group_size < _MIN_BLOCK or w.group_size & (w.group_size - 1)):
        return f"MatMulNBits blocks are powers of two >= {_MIN_BLOCK}, the group size is {w.group_size}"
    if w.q.ndim != 2:
        return "the weight is not a matrix"
    return ""


def _nbits(graph: Any, node: Any, w: PackedWeight, init: dict[str, Any], after: list[Any]) -> Any:
    """The MatMulNBits node that replaces ``node`` (its name and output kept; Gemm's bias as its bias input)."""
    from onnx import helper, numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    n = w.q.shape[0]
    k = w.q.shape[1] * (2 if w.bits == 4 else 1)
    base = f"{node.input[1]}_nbits_{node.name}"
    if w.bits == 4:
        g = w.group_size
        nb = k // g
        blob = np.ascontiguousarray(w.q.reshape(n, nb, g // 2))  # (N, K/g, g/2): same nibble order
        scales = w.scale.astype(np.float32)  # (N, K/g)
        zi = np.clip(np.round(w.zero), 0, 15)  # (N, K/g) integer part of slimkit's float zero
        residual = ((zi - w.zero) * w.scale).astype(np.float32)  # (N, K/g): (q - z) s = (q - zi) s + residual
        zero_bytes = _pack_nibbles(zi.astype(np.uint8))  # (N, ceil(K/g / 2))
    else:
        g = _int8_block(k)
        nb = -(-k // g)
        u8 = np.full((n, nb * g), 128, np.uint8)  # padding columns hold the zero point: weight 0
        u8[:, :k] = (w.q.astype(np.int16) + 128).astype(np.uint8)
        blob = u8.reshape(n, nb, g)  # (N, blocks, g)
        scales = np.repeat(w.scale.astype(np.float32)[:, None], nb, 1)  # (N, blocks)
        zero_bytes = np.full((n, nb), 128, np.uint8)
        residual = None
    graph.initializer.extend([numpy_helper.from_array(blob, f"{base}_B"),
                              numpy_helper.from_array(scales, f"{base}_scales"),
                              numpy_helper.from_array(zero_bytes, f"{base}_zero")])
    inputs = [node.input[0], f"{base}_B", f"{base}_scales", f"{base}_zero"]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = numpy_helper.to_array(init[node.input[2]]).astype(np.float32).reshape(-1)
        graph.initializer.append(numpy_helper.from_array(np.broadcast_to(bias, (n,)).copy(), f"{base}_bias"))
        inputs += ["", f"{base}_bias"]  # g_idx unused
    y = node.output[0]
    out = f"{y}_nbits" if residual is not None and np.any(residual) else y
    new = helper.make_node("MatMulNBits", inputs, [out], name=node.name, domain="com.microsoft", K=k, N=n,
                           bits=w.bits, block_size=g, accuracy_level=0)
    if out != y:  # the float part of the zero points: (x @ G) @ D, G (K, K/g) sums each group, D (K/g, N)
        groups = np.kron(np.eye(nb, dtype=np.float32), np.ones((g, 1), np.float32))  # (K, K/g)
        graph.initializer.extend([numpy_helper.from_array(groups, f"{base}_group_sum"),
                                  numpy_helper.from_array(np.ascontiguousarray(residual.T), f"{base}_residual")])
        x, s, c = node.input[0], f"{base}_xsum", f"{base}_corr"
        after += [helper.make_node("MatMul", [x, f"{base}_group_sum"], [s], name=s),  # (..., K/g)
                  helper.make_node("MatMul", [s, f"{base}_residual"], [c], name=c),  # (..., N)
                  helper.make_node("Add", [out, c], [y], name=f"{base}_add")]
    return new


def _int8_block(k: int) -> int:
    """The block for an int8 row of K weights: the largest power of two <= ``_INT8_BLOCK`` dividing K,
    else 32 (the row padded with zero weights)."""
    b = _INT8_BLOCK
    while b >= _MIN_BLOCK:
        if k % b == 0:
            return b
        b //= 2
    return 32 if k > _MIN_BLOCK else _MIN_BLOCK


def _pack_nibbles(z: np.ndarray) -> np.ndarray:
    """(N, B) values in [0, 15] -> (N, ceil(B/2)) uint8, element 2j low nibble (MatMulNBits zero points)."""
    if z.shape[1] % 2:
        z = np.concatenate([z, np.zeros((z.shape[0], 1), np.uint8)], 1)
    return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)


def _folded_scale(weight: Any, w: PackedWeight) -> np.ndarray | None:
    """Per-output-channel scales that turn the stored int8 codes into the graph's float weight, or None.

    The export folds a following BatchNorm into the conv (each output channel times a factor), so
    the graph's weight may be the stored one scaled per channel: the factor is read off the weight
    and moved into the scales, which keeps the codes and makes the folded weight exact."""
    from onnx import numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    target = numpy_helper.to_array(weight).astype(np.float64).reshape(w.q.shape[0], -1)  # (N, K)
    codes = w.q.astype(np.float64).reshape(w.q.shape[0], -1)  # (N, K)
    power = (codes * codes).sum(1)
    scale = np.where(power > 0, (target * codes).sum(1) / np.maximum(power, 1), w.scale)  # (N,) least squares
    tolerance = 1e-5 * max(float(np.abs(target).max()), 1e-12)
    return scale if float(np.abs(codes * scale[:, None] - target).max()) <= tolerance else None


def _dq_conv(graph: Any, node: Any, w: PackedWeight, before: list[Any]) -> None:
    """The conv's float weight -> int8 codes + DequantizeLinear per output channel (axis 0)."""
    from onnx import helper, numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    name = f"{node.input[1]}_int8_{node.name}"
    weight = next(t for t in graph.initializer if t.name == node.input[1])
    q = w.q.reshape(weight.dims)
    scale = _folded_scale(weight, w)  # the stored scales, times a folded BatchNorm's factor
    graph.initializer.extend([numpy_helper.from_array(q.astype(np.int8), name),
                              numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
                              numpy_helper.from_array(np.zeros(w.scale.shape, np.int8), f"{name}_zero")])
    before.append(helper.make_node("DequantizeLinear", [name, f"{name}_scale", f"{name}_zero"], [f"{name}_dq"],
                                   name=f"{name}_DQ", axis=0))
    node.input[1] = f"{name}_dq"


def _drop_unused(graph: Any) -> None:
    import onnx  # optional (onnx, extra 'onnx'): imported when used

    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        copies = [onnx.TensorProto() for _ in kept]
        for c, t in zip(copies, kept):
            c.CopyFrom(t)  # copy first: clearing the repeated field may invalidate the originals
        del graph.initializer[:]
        graph.initializer.extend(copies)


__all__ = ["BINARY_REASON", "PackedWeight", "freeze_bit_layers", "is_bit_layer", "packed_weight", "write_weight_only"]
