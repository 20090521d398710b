"""ONNX Runtime backend: export the float model, re-quantize slimkit's planned layers to the same
integers, and run them on ORT's integer kernels.

Static int8 is written by slimkit as standard ONNX QDQ, not by ORT's ``quantize_static`` /
``QDQQuantizer``: the weights must be *slimkit's* integers (``quantize_weight_int8``: scale =
max|w|/127 per output channel or per tensor), activations must use slimkit's ranges, nothing
outside the planned layers may be touched (ORT's default static QDQ also quantizes MiniLM's
additive attention mask, calibrates an inf scale there and collapses cosine to 0.34), and a
Conv/Gemm output needs a Q exactly where the next planned layer's range is known, which ORT's
quantizer can only switch per op *type* (and it raises on any quantized tensor without a range).
ORT's optimizer then fuses DQ -> MatMul into ``MatMulIntegerToFloat``, DQ -> Conv -> Q into
``QLinearConv`` and DQ -> Gemm into ``QGemm``; ``OrtModel.kernels`` counts what really runs.
Dynamic int8 is ORT's ``quantize_dynamic`` limited to the planned nodes; its symmetric weights are
the same integers (tests/runtime/test_ort.py checks both modes). A quantized LSTM's gate matrices
are planned one by one but exported as the layer's ``LSTM`` node, which ORT quantizes whole into
``DynamicQuantizeLSTM`` (same int8 rows); ORT has no integer GRU, so a GRU's gates are listed float.
Weight-only layers (mode "none") carry slimkit's stored integers into ``MatMulNBits`` (``onnx_nbits``).
Every session's outputs are compared with torch's on the example before it is returned.

Found on this CPU class (AVX2 without VNNI) and handled here:

- ORT's u8s8 / s8s8 kernels multiply with VPMADDUBSW, whose int16 pair sums saturate: the mnist
  CNN (static) falls from 40 dB to 6 dB SQNR and 99.2 % -> 89.9 % accuracy, a small MLP (dynamic)
  from 41 dB to 13 dB. The same integers stored as uint8 + 127 (zero point 127) take the exact
  u8u8 kernels, ~15 % slower on MiniLM. ``_avoid_saturation`` builds both and keeps int8 unless it
  loses more than ``_SATURATION_DB`` on ``example`` (MiniLM keeps int8: 18.6 vs 19.1 dB). The same
  holds for ``DynamicQuantizeLSTM``: a Conv1d + LSTM test net gives 27.2 dB as int8, 46.5 dB as uint8.
- An int8 Q shared by q/k/v is left unfused by ORT 1.32 (see ``_qdq``).

Transformer fusion (``onnxruntime.transformers.optimizer``, model_type "bert"), measured on MiniLM,
batch 32 x 128 tokens, median ms (2 threads / 1 thread), same process as torch fp32 (1061 / 1738):

    fp32     none  846 / 1490 | SkipLayerNorm+BiasGelu  917 / 1674 | + Attention  879 / 1592
    dynamic  none  648 / 1000 | SkipLayerNorm+BiasGelu  625 / 1032
    static   none  633 /  917 | SkipLayerNorm+BiasGelu  625 / 1076

It never paid off here (ORT already fuses BiasGelu and uses native LayerNormalization; its
SkipLayerNormalization kernel is slower than Add + LayerNormalization on AVX2), so ``_FUSE`` keeps it
off; the path stays for CPUs where it measures faster. A fused Attention would hide q/k/v from the
plan, and ORT's QAttention forces 7-bit weights, so quantized builds never fuse attention.
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

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure.closeness import sqnr_db
from slimkit.runtime._fold import (
    bypass_constant_identities,
    fold_bias,
    gemm_to_matmul,
    store_recurrent_weights,
    unsigned_dynamic_weights,
)
from slimkit.runtime._qdq import insert_qdq
from slimkit.runtime.onnx_export import COMPUTE_OPS, RECURRENT_OPS, export_onnx, flat_outputs, module_nodes
from slimkit.runtime.onnx_nbits import PackedWeight, write_weight_only
from slimkit.runtime.ort_inspect import INTEGER_OPS, Kernels, layer_kernels, output_mismatch, output_ranges

log = logging.getLogger("slimkit.runtime.ort")

#: Model types ORT's transformer optimizer fuses as "bert".
_BERT_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "camembert"}
#: Transformer fusion per mode: None, "norm" (SkipLayerNorm, BiasGelu) or "all" (+ Attention).
_FUSE: dict[str, str | None] = {"float": None, "dynamic": None, "static": None, "none": None}
#: int8 weights may lose this much SQNR on ``example`` against the same integers as uint8 (exact kernels).
_SATURATION_DB = 3.0


@dataclasses.dataclass
class OrtQuantPlan:
    """Which torch modules ORT quantizes, and how; the ranges come from slimkit's own calibration."""

    mode: str  # "dynamic" | "static" | "none" (weight-only: slimkit's integers, ``onnx_nbits``)
    modules: list[str]
    per_channel: bool = True
    #: static: (lo, hi) of each module's *input* activation
    act_ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    symmetric_activations: bool = True  # int8 with zero point 0, else uint8 asymmetric
    #: static: (lo, hi) of each module's *output*, for convs whose output no planned layer reads
    #: (a PReLU, or ReLU then BatchNorm, follows): measured on the example when not given
    out_ranges: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    #: "none": each module's stored integers (``onnx_nbits.packed_weight``)
    weights: dict[str, PackedWeight] = dataclasses.field(default_factory=dict)
    #: modules (not planned) the file keeps in float, and why (binary / ternary layers unpacked)
    kept_float: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("dynamic", "static", "none"):
            raise SlimkitError(f"OrtQuantPlan mode {self.mode!r} is not known", "use 'dynamic', 'static' or 'none'")


class OrtModel:
    """An ONNX Runtime session that runs like the torch model: ``(*tensors) -> tensor`` (first output)."""

    def __init__(self, session: Any, path: Path, threads: int, kernels: Counter, skipped: dict[str, str]) -> None:
        self.session = session
        self.path = path  # the .onnx file the session runs
        self.threads = threads
        self.kernels = kernels  # op types in ORT's optimized graph: what actually executes
        self.skipped = skipped  # planned module -> why it stayed float
        self.layer_kernels: dict[str, str] = {}  # planned module -> the op ORT runs it with
        self.mode = "float"  # the plan's mode: "float" | "dynamic" | "static" | "none" (weight-only)
        self.storage: dict[str, str] = {}  # weight-only module -> how the file stores and runs its weight
        self.file_bytes = path.stat().st_size
        self._inputs = [i.name for i in session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The model's output, or, for a model with several, all of them (flattened, in the torch order)."""
        if len(inputs) != len(self._inputs):
            raise SlimkitError(f"the ONNX model takes {len(self._inputs)} inputs ({', '.join(self._inputs)}), "
                               f"got {len(inputs)}", "call it like the torch model")
        feeds = {n: torch.as_tensor(x).detach().cpu().contiguous().numpy() for n, x in zip(self._inputs, inputs)}
        outputs = [torch.from_numpy(o) for o in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def __repr__(self) -> str:
        return f"OrtModel({self.path}, threads={self.threads}, kernels={dict(self.kernels)})"


def build_ort(model: nn.Module, example: Sequence[torch.Tensor] | torch.Tensor, *, plan: OrtQuantPlan | None = None,
              threads: int | None = None, workdir: Path | None = None, optimize: bool = True) -> OrtModel:
    """Export the float ``model``, quantize ``plan.modules`` and open an ORT session on ``threads`` threads.

    ``optimize=False`` runs the graph as written (no fusion, Q/DQ executed literally): slow, but the
    exact reference for what the integer kernels should compute. Without ``workdir`` the files live
    in a temporary directory removed with the returned model. Before it is returned, the session's
    outputs (all of them) are checked against ``model``'s on ``example``: a graph that computes
    something else is a ``SlimkitError``, not a model (``ort_inspect.output_mismatch`` has the bounds).
    ``model`` is what was exported: for a quantized build, the float model carrying the dequantized
    weights, so only ORT's own activation rounding separates the two.
    """
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    threads = threads or torch.get_num_threads()
    if plan is not None and plan.mode == "static" and not plan.out_ranges:
        plan = dataclasses.replace(plan, out_ranges=output_ranges(model, example, plan.modules))
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="slimkit-ort-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        float_path = export_onnx(model, example, work / "float.onnx")
        fuse = _FUSE[plan.mode if plan else "float"] if optimize else None
        path = work / "model.onnx"
        skipped = _write_graph(float_path, model, plan, fuse, path, unsigned_weights=False, fold=optimize)
        session, kernels = _session(path, threads, optimize)
        with torch.no_grad():
            want = flat_outputs(model(*example))  # torch's outputs: what the graph must compute
        if plan is not None and plan.mode != "none" and optimize and len(skipped) < len(plan.modules):
            session, kernels = _avoid_saturation(model, (example, want[0].float()), (float_path, plan, fuse, path),
                                                 threads, session, kernels)
        kernels_by_layer = layer_kernels(kernels.nodes, [m for m in plan.modules if m not in skipped]) if plan else {}
        skipped |= {m: (plan.weights[m].describe(op) if plan.mode == "none" and m in plan.weights else
                        f"ONNX Runtime runs it as a float {op} (no integer kernel fused)")
                    for m, op in kernels_by_layer.items() if op not in INTEGER_OPS}
        # weight-only: the file holds the model's own weights and float activations, so the float bound holds
        _check_outputs(type(model).__name__, example, want, session, quantized=plan is not None and plan.mode != "none")
        if plan is not None:
            skipped |= plan.kept_float
    except BaseException:
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    for name, reason in skipped.items():
        log.warning("onnxruntime: %s stays float: %s", name, reason)
    result = OrtModel(session, path, threads, kernels, skipped)
    result.layer_kernels = kernels_by_layer
    result.mode = plan.mode if plan else "float"
    if plan is not None and plan.mode == "none":
        result.storage = {m: plan.weights[m].describe(op) for m, op in kernels_by_layer.items() if m in plan.weights}
    if workdir is None:
        weakref.finalize(result, shutil.rmtree, str(work), True)
    return result


def _check_outputs(name: str, example: tuple[torch.Tensor, ...], want: list[torch.Tensor], session: Any,
                   quantized: bool) -> None:
    """Refuse a session whose outputs on ``example`` are not ``want`` (a float bound, or int8's when quantized)."""
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), example)}
    got = [torch.from_numpy(o) for o in session.run(None, feeds)]
    why = output_mismatch(want, got, quantized)
    if why:
        raise SlimkitError(f"the ONNX Runtime graph of {name} does not compute what torch does "
                           f"on the example inputs: {why}", "run it with backend='torch'")
    log.info("onnxruntime: outputs checked against torch on the example inputs (%s bound)",
             "int8" if quantized else "float")


def _write_graph(float_path: Path, model: nn.Module, plan: OrtQuantPlan | None, fuse: str | None, path: Path,
                 unsigned_weights: bool, fold: bool = True) -> dict[str, str]:
    import onnx  # optional (onnx, extra 'onnx'): imported when used

    bert = _bert_shape(model) if fuse else None
    proto = _fuse_transformer(float_path, *bert, attention=fuse == "all") if bert else onnx.load(str(float_path))
    skipped: dict[str, str] = {}
    if plan is not None:
        skipped = _quantize(proto, plan, path.parent, unsigned_weights)
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    if plan is not None and fold:
        fold_bias(path)
    return skipped


def _avoid_saturation(model: nn.Module, example_ref: tuple[tuple[torch.Tensor, ...], torch.Tensor], graph_args: tuple,
                      threads: int, session: Any, kernels: Counter) -> tuple[Any, Counter]:
    """Keep int8 weights unless the same integers stored as uint8 do better by ``_SATURATION_DB``.

    Without VNNI, ORT's u8s8 / s8s8 kernels multiply with VPMADDUBSW, whose int16 pair sums
    saturate; uint8 weights + 127 (zero point 127) take the exact u8u8 kernels, which are slower.
    """
    float_path, plan, fuse, path = graph_args
    example, ref = example_ref  # ref: torch's first output on example
    alt = path.with_name("model_u8.onnx")
    _write_graph(float_path, model, plan, fuse, alt, unsigned_weights=True)
    alt_session, alt_kernels = _session(alt, threads, True)
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), example)}
    db = sqnr_db(ref, torch.from_numpy(session.run(None, feeds)[0]))
    alt_db = sqnr_db(ref, torch.from_numpy(alt_session.run(None, feeds)[0]))
    if db >= alt_db - _SATURATION_DB:
        alt.unlink()
        return session, kernels
    log.info("onnxruntime: int8 weights give %.1f dB, the same integers as uint8 %.1f dB (int16 saturation "
             "in the u8s8 kernels): keeping uint8", db, alt_db)
    alt.replace(path)
    return alt_session, alt_kernels


def _session(path: Path, threads: int, optimize: bool) -> tuple[Any, Counter]:
    """An InferenceSession pinned to ``threads`` and the op types of the graph it really runs."""
    import onnx  # optional (onnx, extra 'onnx'): imported when used
    import onnxruntime as ort  # optional (onnxruntime, extra 'onnx'): imported when used

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # ORT warns about hardware-specific kernels on every optimized save
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    optimized = path.with_name(f".{path.stem}.optimized.onnx")
    so.optimized_model_filepath = str(optimized)
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes = list(onnx.load(str(optimized), load_external_data=False).graph.node)
        kernels = Kernels(n.op_type for n in nodes)
        kernels.nodes = [(n.name, n.op_type, list(n.input)) for n in nodes]
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors
        raise SlimkitError(f"ONNX Runtime cannot load {path.name}: {str(exc).splitlines()[0][:200]}",
                           "report this model; backend='torch' still works") from None
    finally:
        optimized.unlink(missing_ok=True)
    return session, kernels


# --------------------------------------------------------------------------- transformer fusion

def _bert_shape(model: nn.Module) -> tuple[int, int] | None:
    """(num_heads, hidden_size) of the first BERT-like transformers encoder inside ``model``."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "model_type", None) in _BERT_TYPES:
            return int(cfg.num_attention_heads), int(cfg.hidden_size)
    return None


def _fuse_transformer(path: Path, num_heads: int, hidden_size: int, attention: bool) -> Any:
    from onnx import helper  # optional (onnx, extra 'onnx'): imported when used
    from onnxruntime.transformers.fusion_options import (
        FusionOptions,  # optional (onnxruntime, extra 'onnx'): imported when used
    )
    from onnxruntime.transformers.optimizer import (
        optimize_model,  # optional (onnxruntime, extra 'onnx'): imported when used
    )

    options = FusionOptions("bert")
    options.enable_attention = attention  # a fused Attention hides q/k/v from the plan
    with _quiet():
        proto = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                               opt_level=0, optimization_options=options).model
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):  # the fused ops' domain
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


class _quiet:
    """Silence ORT's python tools for one block (they log warnings on every call)."""

    def __enter__(self) -> None:
        self._levels = {n: logging.getLogger(n).level for n in ("", "onnxruntime")}
        for n in self._levels:
            logging.getLogger(n).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for n, level in self._levels.items():
            logging.getLogger(n).setLevel(level)


# --------------------------------------------------------------------------- quantization

def _quantize(proto: Any, plan: OrtQuantPlan, work: Path, unsigned_weights: bool) -> dict[str, str]:
    """Quantize the planned modules' nodes in place; returns the modules left float and why."""
    bypass_constant_identities(proto.graph)
    store_recurrent_weights(proto.graph)
    ancestors = {m: [m.rsplit(".", i)[0] for i in range(1, m.count(".") + 1)] for m in plan.modules}
    found = module_nodes(proto, set(plan.modules) | {a for names in ancestors.values() for a in names})
    # a recurrent layer's gate matrices are planned one by one but exported as one LSTM / GRU node of the layer
    owner = {m: next(a for a in ancestors[m] if _recurrent(found.get(a))) for m in plan.modules
             if m not in found and any(_recurrent(found.get(a)) for a in ancestors[m])}
    skipped = {m: "no MatMul/Gemm/Conv node of this module in the exported graph" for m in plan.modules
               if m not in found and m not in owner}
    skipped |= {m: "ONNX Runtime has no integer GRU (its quantizer covers LSTM only): the GRU node runs float"
                for m, a in owner.items() if _recurrent(found[a]) == "GRU"}
    planned = {m: found[m] for m in plan.modules if m in found}
    if plan.mode == "none":
        skipped |= {m: "its recurrent node runs float (no weight-only LSTM / GRU kernel in ONNX Runtime)"
                    for m in owner}
        stored = {m: nodes for m, nodes in planned.items() if m in plan.weights}
        skipped |= write_weight_only(proto.graph, stored, plan.weights)
        skipped |= {m: "no stored integer form for ONNX (kept as its dequantized float weight)"
                    for m in planned if m not in plan.weights}
        return skipped
    if plan.mode == "dynamic":
        planned |= {a: found[a] for m, a in owner.items() if m not in skipped}  # the layer's LSTM node(s), once
        if plan.per_channel:  # ORT's ConvInteger path quantizes Conv weights per tensor only
            skipped |= {m: "ORT's dynamic Conv has per-tensor weights only" for m, nodes in planned.items()
                        if any(n.op_type == "Conv" for n in nodes)}
            planned = {m: nodes for m, nodes in planned.items() if m not in skipped}
        _dynamic(proto, planned, plan.per_channel, work)
        if unsigned_weights:
            unsigned_dynamic_weights(proto.graph)
        float_nodes = {n.name for n in proto.graph.node if n.op_type in COMPUTE_OPS + RECURRENT_OPS}
        left = {m for m, nodes in planned.items() if any(n.name in float_nodes for n in nodes)}
        skipped |= {m: "ORT's dynamic quantizer left it float" for m in plan.modules
                    if m in left or owner.get(m) in left}
        return skipped
    skipped |= {m: "static int8 has no recurrent kernel on ONNX Runtime" for m in owner if m not in skipped}
    constants = {t.name for t in proto.graph.initializer}
    for m in list(planned):
        lo, hi = plan.act_ranges.get(m, (math.nan, math.nan))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            skipped[m] = f"activation range ({lo}, {hi}) is not finite" if m in plan.act_ranges else "no activation range"
        elif any(i and i not in constants for n in planned[m] for i in n.input[1:]):
            skipped[m] = "its weight or bias is computed in the graph, not stored"
        else:
            continue
        del planned[m]
    insert_qdq(proto.graph, planned, plan, unsigned_weights)
    return skipped


def _recurrent(nodes: list[Any] | None) -> str:
    """"LSTM" / "GRU" when ``nodes`` are a recurrent layer's node(s), else ""."""
    return next((n.op_type for n in nodes or [] if n.op_type in RECURRENT_OPS), "")


def _dynamic(proto: Any, planned: dict[str, list[Any]], per_channel: bool, work: Path) -> None:
    import onnx  # optional (onnx, extra 'onnx'): imported when used
    from onnxruntime.quantization import (  # optional (onnxruntime, extra 'onnx'): imported when used
        QuantType,
        quantize_dynamic,
    )

    names = [n.name for nodes in planned.values() for n in nodes]
    if not names:
        return
    gemm_to_matmul(proto.graph, set(names))  # ORT's dynamic quantizer has no Gemm
    src, dst = work / "dynamic_in.onnx", work / "dynamic_out.onnx"
    onnx.save(proto, str(src))
    with _quiet():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Conv", "LSTM"], nodes_to_quantize=names,
                         per_channel=per_channel, reduce_range=False, weight_type=QuantType.QInt8,
                         extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True,
                                        "DefaultTensorType": onnx.TensorProto.FLOAT})  # for fused ops
    proto.CopyFrom(onnx.load(str(dst)))
    src.unlink()
    dst.unlink()


__all__ = ["OrtModel", "OrtQuantPlan", "build_ort"]
