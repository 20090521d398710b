"""ONNX Runtime backend: export the float model, re-quantize slimkit's planned layers, run on ORT's
integer kernels.

Static int8 is written as standard ONNX QDQ by slimkit itself (``_insert_qdq``) rather than by ORT's
``quantize_static`` / ``QDQQuantizer``: the integers must be *slimkit's* (``quantize_weight_int8``,
scale = max|w|/127, so ORT runs the same model slimkit evaluated), activations must use slimkit's
ranges, nothing outside the planned layers may be touched (ORT's default static QDQ quantizes the
additive attention mask of MiniLM, calibrates an inf scale and collapses cosine to 0.34), and
Conv/Gemm outputs need a Q only where the next planned layer's range is known (ORT's quantizer
decides output quantization per op *type* and raises on any tensor without a range).
ORT's graph optimizer then fuses DQ -> MatMul into ``MatMulIntegerToFloat``, DQ -> Conv -> Q into
``QLinearConv`` and DQ -> Gemm into ``QGemm``; ``OrtModel.kernels`` counts what actually runs.
Dynamic int8 uses ORT's ``quantize_dynamic`` restricted to the planned nodes: its symmetric
per-channel weights are the same integers (asserted in tests/runtime/test_ort.py).

Transformer fusion (``optimize_model(model_type="bert")``: SkipLayerNorm, BiasGelu; the sdpa
export of MiniLM has no Attention pattern it can fuse) is applied before quantization where it
measured faster; see ``_FUSE`` for the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import tempfile
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from slimkit.errors import SlimkitError
from slimkit.runtime.onnx_export import export_onnx, module_nodes

log = logging.getLogger("slimkit.runtime.ort")

#: Ops a quantized value can pass through unchanged in order, from a layer's output to the next
#: layer's input (so that input's range is also a valid range for the output).
_PASS_OPS = {"Relu", "MaxPool", "Flatten", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze"}
#: Model types whose encoders ORT's transformer optimizer fuses as "bert".
_BERT_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
#: Apply the transformer fusion for (fp32, dynamic, static)? Measured on MiniLM, see report.
_ENC = {"act_u8": False, "w_u8": False}
_FUSE = {"float": True, "dynamic": True, "static": True}


@dataclasses.dataclass
class OrtQuantPlan:
    """Which torch modules ORT quantizes, and how; the ranges are slimkit's own calibration."""

    mode: str  # "dynamic" | "static"
    modules: list[str]
    per_channel: bool = True
    #: static: (lo, hi) of each module's *input* activation
    act_ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    symmetric_activations: bool = True  # int8 zero 0, else uint8 asymmetric

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static"):
            raise SlimkitError(f"OrtQuantPlan mode {self.mode!r} is not known", "use 'dynamic' or 'static'")


class OrtModel:
    """An ONNX Runtime session that runs like the torch model: ``(*tensors) -> tensor`` (first output)."""

    def __init__(self, session: Any, path: Path, threads: int, kernels: Counter, skipped: dict[str, str]) -> None:
        self.session = session
        self.path = path
        self.threads = threads
        self.kernels = kernels
        self.skipped = skipped
        self.file_bytes = path.stat().st_size
        self._inputs = [i.name for i in session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self._inputs):
            raise SlimkitError(f"the ONNX model takes {len(self._inputs)} inputs ({', '.join(self._inputs)}), "
                               f"got {len(inputs)}", "call it like the torch model")
        feeds = {n: torch.as_tensor(x).detach().cpu().contiguous().numpy() for n, x in zip(self._inputs, inputs)}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def __repr__(self) -> str:
        return f"OrtModel({self.path.name}, threads={self.threads}, kernels={dict(self.kernels)})"


def build_ort(model: nn.Module, example: Sequence[torch.Tensor] | torch.Tensor, *, plan: OrtQuantPlan | None = None,
              threads: int | None = None, workdir: Path | None = None, optimize: bool = True) -> OrtModel:
    """Export the float ``model``, quantize ``plan.modules`` and open an ORT session on ``threads`` threads.

    ``optimize=False`` runs the graph as written (no fusion, Q/DQ executed literally): slow, but the
    exact reference for what the integer kernels should compute.
    """
    import onnx

    threads = threads or torch.get_num_threads()
    tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="slimkit-ort-")) if tmp else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    float_path = export_onnx(model, example, work / "float.onnx")
    mode = plan.mode if plan else "float"
    bert = _bert_shape(model) if optimize and _FUSE[mode] else None
    proto = _fuse_transformer(float_path, *bert) if bert else onnx.load(str(float_path))
    skipped: dict[str, str] = {}
    if plan is not None:
        proto, skipped = _quantize(proto, plan, work)
    for name, reason in skipped.items():
        log.warning("onnxruntime: %s stays float: %s", name, reason)
    path = work / "model.onnx"
    _save(proto, path)
    session, kernels = _session(path, threads, optimize, work / "optimized.onnx")
    result = OrtModel(session, path, threads, kernels, skipped)
    if tmp:
        weakref.finalize(result, shutil.rmtree, str(work), True)
    return result


# --------------------------------------------------------------------------- session

def _session(path: Path, threads: int, optimize: bool, optimized: Path) -> tuple[Any, Counter]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # the "hardware specific optimizations" notice on every save
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    so.optimized_model_filepath = str(optimized)
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
        raise SlimkitError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:200]}",
                           "report this model; backend='torch' still works") from None
    kernels = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
    return session, kernels


def _save(proto: Any, path: Path) -> None:
    import onnx

    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)


# --------------------------------------------------------------------------- transformer fusion

def _bert_shape(model: nn.Module) -> tuple[int, int] | None:
    """(num_heads, hidden_size) of the first BERT-like transformers encoder inside ``model``."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "model_type", None) in _BERT_TYPES:
            return int(cfg.num_attention_heads), int(cfg.hidden_size)
    return None


def _fuse_transformer(path: Path, num_heads: int, hidden_size: int) -> Any:
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = False  # fused Attention hides q/k/v; QAttention forces 7-bit weights
    with _quiet():
        fused = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options)
    proto = fused.model
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):  # the fused ops' domain
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return proto


class _quiet:
    """Silence ORT's python tools (they warn at WARNING level on every call) for one block."""

    def __enter__(self) -> None:
        self._levels = {n: logging.getLogger(n).level for n in ("", "onnxruntime", "onnxruntime.transformers")}
        for n in self._levels:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)


# --------------------------------------------------------------------------- quantization

def _quantize(proto: Any, plan: OrtQuantPlan, work: Path) -> tuple[Any, dict[str, str]]:
    found = module_nodes(proto)
    skipped = {m: "no MatMul/Gemm/Conv node of this module in the exported graph"
               for m in plan.modules if m not in found}
    planned = {m: found[m] for m in plan.modules if m in found}
    if plan.mode == "static":
        for m in list(planned):
            lo, hi = plan.act_ranges.get(m, (math.nan, math.nan))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                skipped[m] = f"activation range ({lo}, {hi}) is not finite"
                del planned[m]
        _insert_qdq(proto.graph, planned, plan)
        return proto, skipped
    return _dynamic(proto, planned, plan, work), skipped


def _dynamic(proto: Any, planned: dict[str, list[Any]], plan: OrtQuantPlan, work: Path) -> Any:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    names = [n.name for nodes in planned.values() for n in nodes]
    if not names:
        return proto
    _gemm_to_matmul(proto.graph, set(names))  # ORT's dynamic quantizer has no Gemm
    src, dst = work / "dynamic_in.onnx", work / "dynamic_out.onnx"
    onnx.save(proto, str(src))
    with _quiet():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Conv"], nodes_to_quantize=names,
                         per_channel=plan.per_channel, reduce_range=False, weight_type=QuantType.QInt8,
                         extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops: no shape inference
    out = onnx.load(str(dst))
    src.unlink()
    dst.unlink()
    return out


def _gemm_to_matmul(graph: Any, names: set[str]) -> None:
    """Gemm(x, W, b) -> MatMul(x, W as (K, N)) + Add(b), keeping the node's name (so the plan still finds it)."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.name not in names or attrs.get("transA", 0) or node.input[1] not in init \
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(init[node.input[1]])
        w_kn = numpy_helper.from_array(np.ascontiguousarray(w.T if attrs.get("transB", 0) else w), node.input[1] + "_kn")
        graph.initializer.append(w_kn)
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], w_kn.name], [mm_out], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    _replace_nodes(graph, nodes)


# --------------------------------------------------------------------------- static QDQ

def _insert_qdq(graph: Any, planned: dict[str, list[Any]], plan: OrtQuantPlan) -> None:
    """Q/DQ on each planned node's activation input (slimkit's range), its weight (slimkit's int8)
    and bias (int32, scale = s_x * s_w); and on its output where the next planned layer's range is known."""
    module_of = {n.name: m for m, nodes in planned.items() for n in nodes}
    users: dict[str, dict[str, tuple[float, float]]] = {}  # activation tensor -> {planned node: range}
    for n in graph.node:
        if n.name in module_of:
            users.setdefault(n.input[0], {})[n.name] = tuple(plan.act_ranges[module_of[n.name]])
    consumers = _consumers(graph)
    outputs = {o.name for o in graph.output}
    q_outputs: dict[tuple[str, float, int], tuple[str, str, str]] = {}
    added: dict[str, tuple[list[Any], list[Any]]] = {}  # node name -> (nodes before it, nodes after it)
    for node in graph.node:
        if node.name not in module_of:
            continue
        before: list[Any] = []
        after: list[Any] = []
        s_x, z_x = _act_qparams(*users[node.input[0]][node.name], plan.symmetric_activations)
        node.input[0] = _qdq(graph, node.input[0], (s_x, z_x, plan.symmetric_activations), node.name, q_outputs, before)
        s_w = _quantize_weight(graph, node, plan.per_channel, before)
        if node.op_type in ("Gemm", "Conv") and len(node.input) > 2 and node.input[2]:
            _quantize_bias(graph, node, s_x * s_w, before)
        out_range = _downstream_range(node.output[0], consumers, users, outputs)
        if out_range is not None:
            qp = (*_act_qparams(*out_range, plan.symmetric_activations), plan.symmetric_activations)
            _qdq_output(graph, node, qp, after)
        added[node.name] = (before, after)
    nodes = [m for n in graph.node for m in (added[n.name][0] + [n] + added[n.name][1] if n.name in added else [n])]
    _replace_nodes(graph, nodes)


def _act_qparams(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    from slimkit.quantize.calibrate import scale_zero_point

    return scale_zero_point(float(lo), float(hi), 8, symmetric)


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for n in graph.node:
        for t in n.input:
            out.setdefault(t, []).append(n)
    return out


def _downstream_range(tensor: str, consumers: dict[str, list[Any]], users: dict[str, dict[str, tuple]],
                      outputs: set[str]) -> tuple[float, float] | None:
    """The input range of the planned layers that ``tensor`` reaches through order-preserving ops.

    Only when every reader on the way is such an op and the tensor reached feeds planned layers
    alone, all with one range (so nothing outside the plan sees a quantized value). Max commutes
    with every op in ``_PASS_OPS``; min does too except through MaxPool, where a Relu on the way
    makes the clipped negatives irrelevant.
    """
    seen: set[str] = set()
    while tensor not in outputs:
        readers = consumers.get(tensor, [])
        if tensor in users:
            ranges = set(users[tensor].values())
            if len(readers) != len(users[tensor]) or len(ranges) != 1 or ("MaxPool" in seen and "Relu" not in seen):
                return None
            return ranges.pop()
        if len(readers) != 1 or readers[0].op_type not in _PASS_OPS:
            return None
        seen.add(readers[0].op_type)
        tensor = readers[0].output[0]
    return None


def _qdq(graph: Any, tensor: str, qp: tuple[float, int, bool], consumer: str, q_outputs: dict,
         out: list[Any]) -> str:
    """Quantize ``tensor`` once per (scale, zero, signed) and give ``consumer`` its own DequantizeLinear."""
    from onnx import helper

    key = (tensor, *qp)
    if key not in q_outputs:
        base = f"{tensor}_q{len(q_outputs)}"
        graph.initializer.extend(_qparams(base, qp))
        q_outputs[key] = (base, f"{base}_scale", f"{base}_zero")
        out.append(helper.make_node("QuantizeLinear", [tensor, base + "_scale", base + "_zero"], [base],
                                    name=f"{base}_Q"))
    q, s, z = q_outputs[key]
    dq = f"{q}_dq_{consumer}"
    out.append(helper.make_node("DequantizeLinear", [q, s, z], [dq], name=f"{dq}_DQ"))
    return dq


def _qparams(base: str, qp: tuple[float, int, bool]) -> list[Any]:
    from onnx import TensorProto, helper

    scale, zero, symmetric = qp
    dtype = TensorProto.INT8 if symmetric else TensorProto.UINT8  # slimkit's two activation formats
    if symmetric and _ENC["act_u8"]:
        dtype, zero = TensorProto.UINT8, 128
    return [helper.make_tensor(f"{base}_scale", TensorProto.FLOAT, [], [scale]),
            helper.make_tensor(f"{base}_zero", dtype, [], [zero])]


def _qdq_output(graph: Any, node: Any, qp: tuple[float, int, bool], out: list[Any]) -> None:
    from onnx import helper

    y = node.output[0]
    raw = f"{y}_float"
    node.output[0] = raw
    graph.initializer.extend(_qparams(raw, qp))
    out += [helper.make_node("QuantizeLinear", [raw, f"{raw}_scale", f"{raw}_zero"], [f"{raw}_q"], name=f"{raw}_Q"),
            helper.make_node("DequantizeLinear", [f"{raw}_q", f"{raw}_scale", f"{raw}_zero"], [y], name=f"{raw}_DQ")]



def _quantize_weight(graph: Any, node: Any, per_channel: bool, out: list[Any]) -> np.ndarray:
    """Replace the float weight by slimkit's int8 weight + DequantizeLinear; returns the scale (N,) or ()."""
    from onnx import helper, numpy_helper

    from slimkit.quantize.pack import quantize_weight_int8

    init = {t.name: t for t in graph.initializer}
    w = numpy_helper.to_array(init[node.input[1]])
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # torch layout is (N, K) / (N, C, kh, kw); MatMul stores (K, N), Gemm (K, N) unless transB.
    transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
    q, scale = quantize_weight_int8(torch.from_numpy(np.array(w.T if transposed else w)), per_channel)
    q_np = q.numpy().T.copy() if transposed else q.numpy()
    scale_np = scale.numpy().astype(np.float32) if per_channel else scale.numpy().astype(np.float32).reshape(())
    name = f"{node.input[1]}_int8_{node.name}"
    zero = np.zeros(scale_np.shape, np.int8)
    if _ENC["w_u8"]:
        q_np, zero = (q_np.astype(np.int16) + 127).astype(np.uint8), np.full(scale_np.shape, 127, np.uint8)
    graph.initializer.extend([numpy_helper.from_array(q_np, name), numpy_helper.from_array(scale_np, name + "_scale"),
                              numpy_helper.from_array(zero, name + "_zero")])
    axis = {"axis": 1 if transposed else 0} if per_channel else {}
    out.append(helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zero"], [name + "_dq"],
                                name=name + "_DQ", **axis))
    old, node.input[1] = node.input[1], name + "_dq"
    _drop_if_unused(graph, old)
    return scale_np


def _quantize_bias(graph: Any, node: Any, scale: np.ndarray, out: list[Any]) -> None:
    from onnx import helper, numpy_helper

    init = {t.name: t for t in graph.initializer}
    b = numpy_helper.to_array(init[node.input[2]]).astype(np.float64)
    scale = np.broadcast_to(scale, b.shape).astype(np.float32)
    q = np.clip(np.round(b / scale), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    name = f"{node.input[2]}_int32_{node.name}"
    graph.initializer.extend([numpy_helper.from_array(q, name), numpy_helper.from_array(scale, name + "_scale"),
                              numpy_helper.from_array(np.zeros(b.shape, np.int32), name + "_zero")])
    out.append(helper.make_node("DequantizeLinear", [name, name + "_scale", name + "_zero"], [name + "_dq"],
                                name=name + "_DQ", axis=0))
    old, node.input[2] = node.input[2], name + "_dq"
    _drop_if_unused(graph, old)


def _replace_nodes(graph: Any, nodes: list[Any]) -> None:
    import onnx

    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes):
        c.CopyFrom(n)  # copy first: clearing the repeated field may invalidate the originals
    del graph.node[:]
    graph.node.extend(copies)


def _drop_if_unused(graph: Any, name: str) -> None:
    if not any(name in n.input for n in graph.node):
        for t in graph.initializer:
            if t.name == name:
                graph.initializer.remove(t)
                return


__all__ = ["OrtModel", "OrtQuantPlan", "build_ort"]
