"""Backends that run a (quantized) model for real: ``build(model, backend) -> runnable``.

- ``torch``: the model itself; quantized layers call torch's integer kernels where they exist.
- ``onnxruntime``: quantized layers are exported in float and re-quantized to the *same*
  integers by ONNX Runtime's quantizer with slimkit's calibrated ranges, then run on its
  integer kernels (QLinearMatMul / QLinearConv / MatMulInteger); weight-only layers carry slimkit's
  stored integers into ``MatMulNBits`` (``runtime.onnx_nbits``).
- ``cuda``: every Linear rebuilt on GPU kernels (int8 ``_int_mm``, int4 tinygemm, fp8 ``_scaled_mm``,
  2:4 cuSPARSELt) as the model's quantization says; ``runtime.cuda.build_cuda`` picks a scheme.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

import torch.nn as nn

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.runtime_needs import quantized_layers
from slimkit.io.artifact import load, read_meta
from slimkit.runtime.cuda import build_cuda
from slimkit.runtime.layout import fastest_layout
from slimkit.runtime.onnx_nbits import freeze_bit_layers, is_bit_layer, packed_weight
from slimkit.runtime.ort import OrtQuantPlan, build_ort

log = logging.getLogger("slimkit.runtime")

BACKENDS = ("torch", "onnxruntime", "cuda")

#: Which backend ``"auto"`` picks per quantization mode: the faster one measured by bench/quant_cpu.py
#: on this CPU class (2 AVX2 cores, no VNNI); ``bench/results/quant_cpu.json`` ("backend_choice")
#: re-checks every choice against that run's numbers.
DEFAULT_BACKEND = {"float": "torch", "dynamic": "onnxruntime", "static": "onnxruntime", "none": "onnxruntime",
                   "mixed": "torch"}

#: Why each default, in one line (speedups vs fp32 torch, 2 threads, bench/quant_cpu.py 2026-11-23 12:31 UTC).
BACKEND_EVIDENCE = {
    "dynamic": "measured faster than torch's kernels on both built-in tasks (MiniLM batch 32x128: 2.00x vs 1.64x "
               "fp32 torch; mnist batch 256: 3.28x vs 1.55x)",
    "static": "torch has no exact static int8 kernel without VNNI (it emulates in fp32); onnxruntime runs integer "
              "kernels (MiniLM batch 32x128 2.27x fp32 torch, asymmetric activations)",
    "none": "ONNX Runtime's MatMulNBits on slimkit's integers (fp32 activations) measured faster than torch's "
            "weight-only kernels on a MiniLM-size Linear stack at 1x128 tokens (bench/onnx_nbits.py 2026-12-07, "
            "2 threads: int4 g32 691 vs 2563 ms, int8 740 vs 1858 ms; at one token int4 108 vs 242 ms, but int8 "
            "333 vs 128 ms: name backend='torch' for one-token int8)",
    "float": "the float model runs as it is",
    "mixed": "layers of several quantization modes (mixed precision: weight-only int4 beside int8 x int8 layers); "
             "only torch runs each layer on its own kernels",
}


def quant_mode(model: nn.Module) -> str:
    """``"float"``, the single activation mode of the model's quantized layers, or ``"mixed"``."""
    modes = {m.runtime_needs().activations for m in quantized_layers(model).values()}
    if not modes:
        return "float"
    return modes.pop() if len(modes) == 1 else "mixed"


def resolve_backend(model: nn.Module, backend: str = "auto") -> str:
    if backend == "auto":  # the measured default, unless a layer cannot run there (torch runs every layer)
        chosen = DEFAULT_BACKEND[quant_mode(model)]
        return "torch" if _refusal(model, chosen) else chosen
    if backend not in BACKENDS:
        raise SlimkitError(f"backend {backend!r} is not known", f"use auto or one of {', '.join(BACKENDS)}")
    return backend


def backend_reason(model: nn.Module, backend: str = "auto") -> str:
    """One line for reports: which backend runs ``model`` and why (the measured default, or the user's choice)."""
    chosen = resolve_backend(model, backend)
    if backend != "auto":
        return f"{chosen}: set by the config (backend={backend!r})"
    mode = quant_mode(model)
    refusal = _refusal(model, DEFAULT_BACKEND[mode])
    if refusal:
        return f"{chosen}: {refusal}"
    return f"{chosen}: default for {mode} quantization, {BACKEND_EVIDENCE[mode]}"


def build(model: nn.Module, backend: str = "auto", example: Any = None, *, threads: int | None = None,
          layout: str = "auto") -> Any:
    """A runnable for ``model`` on ``backend`` (``run(*inputs) -> outputs``).

    ``layout`` (torch, float conv nets on the CPU): ``auto`` times NCHW and channels-last on
    ``example`` and keeps the faster (``slimkit.runtime.layout``); ``contiguous`` runs as trained.
    When ``auto`` chose onnxruntime and the export or its output check refuses the model, the torch
    model is returned and the reason logged; a named backend raises.
    """
    requested, backend = backend, resolve_backend(model, backend)
    if layout not in ("auto", "contiguous"):
        raise SlimkitError(f"layout {layout!r} is not known", "use auto or contiguous")
    if backend == "torch":
        if layout == "auto" and example is not None and quant_mode(model) == "float" and _on_cpu(model):
            examples = (example,) if not isinstance(example, (tuple, list)) else tuple(example)
            return fastest_layout(model, examples, threads=threads)[0]
        return model.eval()
    refuse_unsupported(model, backend)
    if backend == "cuda":
        return build_cuda(model)
    if example is None:
        raise SlimkitError("the onnxruntime backend needs example inputs to export the model",
                           "pass example=task.example")

    float_model, plan = ort_plan(model)
    try:  # build_ort checks the graph's outputs against torch's on the example
        return build_ort(float_model, example, plan=plan, threads=threads)
    except SlimkitError as exc:
        if requested != "auto":
            raise
        log.warning("backend auto: onnxruntime cannot run %s (%s); running it on torch", type(model).__name__, exc)
        return model.eval()


def ort_plan(model: nn.Module) -> tuple[nn.Module, Any]:
    """The float model to export and the plan that re-quantizes its layers in ONNX Runtime."""

    quantized = quantized_layers(model)
    mode = quant_mode(model)
    bits = [n for n, m in model.named_modules() if n and is_bit_layer(m)]  # bit-packed: binary, ternary, 4-bit codes
    if mode == "float" and not bits:
        return model.eval(), None
    if mode == "mixed":
        modes = sorted({m.runtime_needs().activations for m in quantized.values()})
        raise SlimkitError(f"the model mixes quantization modes {modes}, which ONNX Runtime cannot re-create",
                           "use backend='torch' (or auto) for mixed-precision models")
    float_model = copy.deepcopy(model).eval()
    kept_float = freeze_bit_layers(float_model)  # the tracer cannot write the unpacking of bit-packed codes
    layers = {**quantized, **{n: model.get_submodule(n) for n in bits}}
    weights = {n: w for n, m in layers.items() if (w := packed_weight(m)) is not None}
    if mode in ("float", "none"):  # weight-only: each layer's stored integers go into the file as they are
        for name, m in quantized.items():
            set_submodule(float_model, name, m.to_float())
        modules = [n for n in layers if n in weights or n in quantized]
        return float_model, OrtQuantPlan(mode="none", modules=modules, weights=weights, kept_float=kept_float)
    kept_float |= {n: f"4-bit codes beside {mode} int8 layers: stored unpacked as float32"
                   for n in bits if n in weights}
    ranges: dict[str, tuple[float, float]] = {}
    per_channel = True
    symmetric = True
    for name, m in quantized.items():
        set_submodule(float_model, name, m.to_float())
        needs = m.runtime_needs()
        per_channel = per_channel and needs.per_channel
        if mode == "static":
            ranges[name] = m.act_range()
            symmetric = symmetric and needs.symmetric_activations
    plan = OrtQuantPlan(mode=mode, modules=list(quantized), per_channel=per_channel, act_ranges=ranges,
                        symmetric_activations=symmetric, kept_float=kept_float)
    return float_model, plan


def refuse_unsupported(model: nn.Module, backend: str) -> None:
    """A one-line error naming the first layer that says it cannot run on ``backend``, and why."""
    refusal = _refusal(model, backend)
    if refusal:
        raise SlimkitError(refusal, "use backend='torch' (or auto)")


def _refusal(model: nn.Module, backend: str) -> str:
    """Why the first layer that cannot run on ``backend`` cannot ("" when every layer can)."""
    for name, layer in quantized_layers(model).items():
        reason = layer.runtime_needs().unsupported.get(backend)
        if reason:
            return f"layer {name!r} ({type(layer).__name__}) cannot run on {backend}: {reason}"
    return ""


def _on_cpu(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" for p in model.parameters())


def load_deployed(path: str | os.PathLike[str], example: Any, *, threads: int | None = None) -> Any:
    """A saved artifact built on the runtime it was measured on (its metadata's ``extra.backend``, written by
    ``slimkit optimize`` and ``apply``), so its score is the one the search and the report quoted."""
    backend = read_meta(path).get("extra", {}).get("backend") or "auto"
    return build(load(path), backend, example, threads=threads)


__all__ = ["BACKENDS", "BACKEND_EVIDENCE", "DEFAULT_BACKEND", "backend_reason", "build", "load_deployed", "ort_plan",
           "quant_mode", "refuse_unsupported", "resolve_backend"]
