"""Graph rewrites around ORT's quantizer and optimizer: stored weights where the quantizer needs
them, Gemm as MatMul for its dynamic path, and each bias ``Add`` folded into the
``MatMulIntegerToFloat`` before it in ORT's optimized graph.

ORT's optimizer turns DQ -> MatMul into ``MatMulIntegerToFloat`` but leaves the Linear's bias as
a separate ``Add`` over the whole (B, T, N) output, although the fused op takes a bias input.
Measured on MiniLM, batch 32 x 128, 2 threads (ORT per-op profile, 7 runs): the 30 bias Adds
cost 24 of 682 ms; folded, ``Add`` falls from 49 to 25 ms and the outputs are identical (the
kernel adds the same fp32 bias after scaling). So slimkit saves ORT's hardware-independent
("extended") optimization of the graph, folds the bias there, and opens the session on that.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from slimkit.runtime._qdq import replace_nodes
from slimkit.runtime.onnx_export import RECURRENT_OPS

#: MatMulIntegerToFloat inputs: A, B, a_scale, b_scale, a_zero_point, b_zero_point, bias.
_BIAS_INPUT = 6


def fold_bias(path: Path) -> int:
    """Rewrite ``path`` as ORT's extended-optimized graph with biases folded; returns how many were folded.

    Leaves ``path`` untouched when nothing folds (the graph then runs as ORT would run it anyway).
    """
    import onnx  # optional (onnx, extra 'onnx'): imported when used
    import onnxruntime as ort  # optional (onnxruntime, extra 'onnx'): imported when used

    optimized = path.with_name(f".{path.stem}.extended.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # only the graph is wanted
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(optimized)
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        proto = onnx.load(str(optimized))
    finally:
        optimized.unlink(missing_ok=True)
    folded = _fold(proto.graph)
    if folded:
        tmp = path.with_name(f".{path.name}.tmp")
        onnx.save(proto, str(tmp))
        tmp.replace(path)
    return folded


def _fold(graph: Any) -> int:
    from onnx import numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    init = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    dropped: set[str] = set()  # outputs of the folded Adds (now written by the MatMulIntegerToFloat)
    for node in graph.node:
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) > _BIAS_INPUT or node.output[0] in outputs:
            continue
        users = consumers[node.output[0]]
        if len(users) != 1 or users[0].op_type != "Add" or node.input[1] not in init:
            continue
        add = users[0]
        bias = next((i for i in add.input if i != node.output[0]), None)
        n_out = init[node.input[1]].dims[-1]  # B is (K, N)
        if bias not in init or list(init[bias].dims) != [n_out] or numpy_helper.to_array(init[bias]).dtype.kind != "f":
            continue
        node.input.extend([""] * (_BIAS_INPUT - len(node.input)) + [bias])
        node.output[0] = add.output[0]
        dropped.add(add.output[0])
    if dropped:
        keep = [n for n in graph.node if not (n.op_type == "Add" and n.output[0] in dropped)]

        replace_nodes(graph, keep)
    return len(dropped)



# --------------------------------------------------------------------------- rewrites for ORT's quantizer

def store_recurrent_weights(graph: Any) -> None:
    """W, R, B of LSTM / GRU nodes as initializers (a QuantRecurrent exports them as Constant nodes):
    ORT's quantizer only quantizes stored weights."""
    from onnx import helper  # optional (onnx, extra 'onnx'): imported when used

    wanted = {i for n in graph.node if n.op_type in RECURRENT_OPS for i in n.input[1:4] if i}
    moved = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output[0] in wanted
             and [a.name for a in n.attribute] == ["value"]}
    for name, node in moved.items():
        tensor = helper.get_attribute_value(node.attribute[0])
        tensor.name = name
        graph.initializer.append(tensor)
    if moved:
        replace_nodes(graph, [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in moved)])


def bypass_constant_identities(graph: Any) -> None:
    """Nodes read stored weights directly, not through the ``Identity`` the exporter puts on a weight
    two modules share (HF ResNet's convs): the quantizers need the weight to be an initializer."""
    stored = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in stored and n.output[0] not in outputs}
    if not alias:
        return
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(kept)


#: Integer ops with int8 weights: op -> positions of (weight, its zero point) among the inputs.
_INT8_WEIGHTS = {"MatMulInteger": ((1, 3),), "ConvInteger": ((1, 3),),
                 "DynamicQuantizeLSTM": ((1, 9), (2, 11))}  # X, W, R, B, lens, h0, c0, P, W_s, W_zp, R_s, R_zp


def unsigned_dynamic_weights(graph: Any) -> None:
    """The int8 weights of MatMulInteger / ConvInteger / DynamicQuantizeLSTM as uint8 + 127 with zero
    point 127 (same integers)."""
    from onnx import numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    init = {t.name: t for t in graph.initializer}
    for node in graph.node:
        for w, zero in _INT8_WEIGHTS.get(node.op_type, ()):
            if len(node.input) <= zero:
                continue
            for name in (node.input[w], node.input[zero]):
                v = numpy_helper.to_array(init[name])
                if v.dtype == np.int8:
                    init[name].CopyFrom(numpy_helper.from_array((v.astype(np.int16) + 127).astype(np.uint8), name))


def gemm_to_matmul(graph: Any, names: set[str]) -> None:
    """Gemm(x, W, b) -> MatMul(x, W as (K, N)) + Add(b), keeping the node's name."""
    from onnx import helper, numpy_helper  # optional (onnx, extra 'onnx'): imported when used

    init = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.name not in names or node.input[1] not in init or attrs.get("transA", 0) \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        kn = node.input[1] + "_kn"
        if kn not in init:  # once per weight: an unrolled loop (an LSTMCell stepped in Python) reuses it
            w = numpy_helper.to_array(init[node.input[1]])
            init[kn] = numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w), kn)
            graph.initializer.append(init[kn])
        bias = len(node.input) > 2 and node.input[2]
        y = node.output[0] + "_mm" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], kn], [y], name=node.name))
        if bias:
            nodes.append(helper.make_node("Add", [y, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    replace_nodes(graph, nodes)


__all__ = ["bypass_constant_identities", "fold_bias", "gemm_to_matmul", "store_recurrent_weights",
           "unsigned_dynamic_weights"]
