"""Static int8 as standard ONNX QDQ, written by slimkit with slimkit's integers and ranges.

Why not ORT's ``quantize_static``: see ``slimkit.runtime.ort``. Each planned node gets Q -> DQ on
its activation input (slimkit's calibrated range), its weight as slimkit's int8 + DequantizeLinear,
an int32 bias (Gemm / Conv) and a Q -> DQ on its output where the next planned layer's range is
known; ORT's optimizer then fuses these into its integer kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimkit.calibrate.ranges import scale_zero_point
from slimkit.formats.pack import quantize_weight_int8

#: Ops a value passes through in order, so the next layer's input range also bounds it.
_PASS_OPS = {"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze"}


def insert_qdq(graph: Any, planned: dict[str, list[Any]], plan: OrtQuantPlan, unsigned_weights: bool) -> None:
    """Q/DQ on each planned node's activation input (slimkit's range), its weight (slimkit's int8),
    its bias (int32, scale s_x * s_w) and its output where the next planned layer's range is known."""
    module_of = {n.name: m for m, nodes in planned.items() for n in nodes}
    users: dict[str, dict[str, tuple]] = {}  # activation tensor -> {planned node: its range}
    for n in graph.node:
        if n.name in module_of:
            users.setdefault(n.input[0], {})[n.name] = tuple(plan.act_ranges[module_of[n.name]])
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in graph.output}
    added: dict[str, tuple[list[Any], list[Any]]] = {}  # node name -> (nodes before it, nodes after it)
    for node in graph.node:
        if node.name not in module_of:
            continue
        before: list[Any] = []
        after: list[Any] = []
        qp_x = _act_qparams(users[node.input[0]][node.name], plan.symmetric_activations)
        node.input[0] = _qdq(graph, node.input[0], f"{node.input[0]}_q_{node.name}", qp_x, before)
        s_w = _quantize_weight(graph, node, plan.per_channel, unsigned_weights, before)
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
            _quantize_bias(graph, node, qp_x[0] * s_w, before)
        out_range = _downstream_range(node.output[0], consumers, users, outputs)
        if out_range is None and node.op_type == "Conv":  # QLinearConv needs a quantized output: the conv's own range
            out_range = plan.out_ranges.get(module_of[node.name])
        if out_range is not None:
            y = node.output[0]
            node.output[0] = f"{y}_float"
            _qdq(graph, node.output[0], f"{y}_q", _act_qparams(out_range, plan.symmetric_activations), after, y)
        added[node.name] = (before, after)
    replace_nodes(graph, [m for n in graph.node
                           for m in ([*added[n.name][0], n, *added[n.name][1]] if n.name in added else [n])])


def _downstream_range(tensor: str, consumers: dict[str, list[Any]], users: dict[str, dict[str, tuple]],
                      outputs: set[str]) -> tuple[float, float] | None:
    """The input range of the planned layers ``tensor`` flows into through order-preserving ops.

    Only if every reader on the way is such an op and the tensor reached feeds planned layers
    alone, all with one range: nothing outside the plan may see a quantized value. Max commutes with
    every op in ``_PASS_OPS``; min too except through MaxPool, unless a Relu makes it moot.
    """
    seen: set[str] = set()
    while tensor not in outputs:
        readers = consumers.get(tensor, [])
        if tensor in users:
            ranges = set(users[tensor].values())
            ok = len(readers) == len(users[tensor]) and len(ranges) == 1 and ("Relu" in seen or "MaxPool" not in seen)
            return ranges.pop() if ok else None
        if len(readers) != 1 or readers[0].op_type not in _PASS_OPS:
            return None
        seen.add(readers[0].op_type)
        tensor = readers[0].output[0]
    return None


def _act_qparams(lo_hi: tuple[float, float], symmetric: bool) -> tuple[float, int, int]:
    """(scale, zero point, ONNX dtype) of slimkit's activation format for the range."""
    from onnx import TensorProto  # optional (onnx, extra 'onnx'): imported when used


    scale, zero = scale_zero_point(float(lo_hi[0]), float(lo_hi[1]), 8, symmetric)
    return scale, zero, TensorProto.INT8 if symmetric else TensorProto.UINT8


def _qdq(graph: Any, x: str, base: str, qp: tuple[float, int, int], out: list[Any], y: str | None = None) -> str:
    """Append Q -> DQ on ``x``; returns the dequantized name.

    Every consumer gets its own pair: ORT 1.32 leaves an int8 Q shared by q/k/v unfused (float
    MatMul on dequantized values: 410 of 1365 ms in MiniLM); a Q of its own costs ~1 ms.
    """
    from onnx import TensorProto, helper  # optional (onnx, extra 'onnx'): imported when used

    scale, zero, dtype = qp
    graph.initializer.extend([helper.make_tensor(f"{base}_scale", TensorProto.FLOAT, [], [scale]),
                              helper.make_tensor(f"{base}_zero", dtype, [], [zero])])
    y = y or f"{base}_dq"
    out += [helper.make_node("QuantizeLinear", [x, f"{base}_scale", f"{base}_zero"], [base], name=f"{base}_Q"),
            helper.make_node("DequantizeLinear", [base, f"{base}_scale", f"{base}_zero"], [y], name=f"{base}_DQ")]
    return y


def _quantize_weight(graph: Any, node: Any, per_channel: bool, unsigned: bool, out: list[Any]) -> np.ndarray:
    """Swap the float weight for slimkit's int8 weight + DequantizeLinear; returns the scale, (N,) or ().

    ``unsigned`` stores the same integers as uint8 + 127 with zero point 127 (the exact u8u8 kernels).
    """
    from onnx import helper, numpy_helper  # optional (onnx, extra 'onnx'): imported when used


    w = numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[1]))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # torch keeps (N, K) / (N, C, kh, kw); MatMul stores (K, N), and so does Gemm without transB.
    transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
    q, scale = quantize_weight_int8(torch.from_numpy(np.array(w.T if transposed else w)), per_channel)
    q_np = q.numpy().T.copy() if transposed else q.numpy()
    scale_np = scale.numpy().astype(np.float32).reshape(-1 if per_channel else ())
    zero = np.zeros(scale_np.shape, np.int8)
    if unsigned:
        q_np, zero = (q_np.astype(np.int16) + 127).astype(np.uint8), np.full(scale_np.shape, 127, np.uint8)
    name = f"{node.input[1]}_int8_{node.name}"
    graph.initializer.extend([numpy_helper.from_array(q_np, name), numpy_helper.from_array(scale_np, name + "_scale"),
                              numpy_helper.from_array(zero, name + "_zero")])
    axis = {"axis": 1 if transposed else 0} if per_channel else {}
    out.append(helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zero"], [name + "_dq"],
                                name=name + "_DQ", **axis))
    _swap_input(graph, node, 1, name + "_dq")
    return scale_np


def _quantize_bias(graph: Any, node: Any, scale: np.ndarray, out: list[Any]) -> None:
    """int32 bias with scale s_x * s_w: the form QLinearConv / QGemm fusion requires."""
    from onnx import helper, numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    b = numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[2])).astype(np.float64)
    scale = np.broadcast_to(scale, b.shape).astype(np.float32)
    q = np.clip(np.round(b / scale), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    name = f"{node.input[2]}_int32_{node.name}"
    graph.initializer.extend([numpy_helper.from_array(q, name), numpy_helper.from_array(scale, name + "_scale"),
                              numpy_helper.from_array(np.zeros(b.shape, np.int32), name + "_zero")])
    out.append(helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zero"], [name + "_dq"],
                                name=name + "_DQ", axis=0))
    _swap_input(graph, node, 2, name + "_dq")


def _swap_input(graph: Any, node: Any, i: int, new: str) -> None:
    """Point ``node.input[i]`` at ``new`` and drop the old initializer if nothing else reads it."""
    old, node.input[i] = node.input[i], new
    if not any(old in n.input for n in graph.node):
        graph.initializer.remove(next(t for t in graph.initializer if t.name == old))


def replace_nodes(graph: Any, nodes: list[Any]) -> None:
    import onnx  # optional (onnx, extra 'onnx'): imported when used

    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)  # copy first: clearing the repeated field may invalidate the originals
    del graph.node[:]
    graph.node.extend(copies)


__all__ = ["insert_qdq", "replace_nodes"]
