"""An ESTIMATE of the energy of one inference, from operation and memory-access counts.

This is arithmetic, not a measurement: MACs times the energy of a multiply and an add at the
weights' precision, plus the weights read once from DRAM and the activations moved through
on-chip SRAM. The per-operation figures are Horowitz's 45 nm numbers (ISSCC 2014), which the
reference chapter (seeds/004, "Energy costs") also uses. They show *why* lower precision and
fewer bytes save energy; absolute values on a modern chip will differ.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.runtime_needs import QuantizedLayer
from slimkit.measure._call import Example, device_for, prepared, require_module, state_bytes
from slimkit.measure._trace import Tracer
from slimkit.measure.flops import FlopCount, count_flops

CITATION = ("M. Horowitz, \"Computing's Energy Problem (and what we can do about it)\", "
            "IEEE ISSCC 2014, 45 nm figures")
BASIS = f"estimate from MAC and memory-access counts, not a measurement; per-op energy from {CITATION}"

#: Picojoules per operation (Horowitz 2014, 45 nm).
OP_PJ: dict[str, float] = {
    "fp32_add": 0.9, "fp32_mult": 3.7,
    "fp16_add": 0.4, "fp16_mult": 1.1,
    "int32_add": 0.1, "int32_mult": 3.1,
    "int8_add": 0.03, "int8_mult": 0.2,
}
SRAM_READ_32BIT_PJ = 5.0  # 8 KB SRAM, one 32-bit word
DRAM_READ_32BIT_PJ = 640.0  # off-chip DRAM, one 32-bit word

#: Picojoules per multiply-accumulate, by the precision the weights are stored in. An int8 MAC
#: accumulates into 32 bits (every integer kernel does, 8 bits would overflow). Horowitz gives no
#: bf16 figures; a bf16 multiplier is smaller than an fp16 one, so the fp16 figure is an upper bound.
MAC_PJ: dict[str, float] = {
    "fp32": OP_PJ["fp32_mult"] + OP_PJ["fp32_add"],
    "fp16": OP_PJ["fp16_mult"] + OP_PJ["fp16_add"],
    "bf16": OP_PJ["fp16_mult"] + OP_PJ["fp16_add"],
    "int8": OP_PJ["int8_mult"] + OP_PJ["int32_add"],
    "int32": OP_PJ["int32_mult"] + OP_PJ["int32_add"],
}


@dataclasses.dataclass(frozen=True)
class Energy:
    """Estimated energy of one inference, in millijoules, with the counts it was computed from."""

    total_mj: float
    compute_mj: float
    weights_mj: float  # weights read once from DRAM
    activations_mj: float  # activations read and written once through SRAM
    macs_by_precision: dict[str, int]
    weight_bytes: int
    activation_bytes: int
    basis: str = BASIS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def precision_of(dtype: torch.dtype) -> str:
    """The row of :data:`MAC_PJ` a tensor dtype falls in (wider floats count as fp32, wider ints as int32)."""
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    if not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool:
        bits = torch.iinfo(dtype).bits if _has_iinfo(dtype) else 8  # qint8/quint8/quint4x2: 8 or fewer
        return "int8" if bits <= 8 else "int32"
    return "fp32"


def estimate_energy(model: nn.Module, example: Example, device: str | torch.device | None = None,
                    compute_dtype: torch.dtype | None = None, flops: FlopCount | None = None) -> Energy:
    """Estimate the energy of one ``model(*example)``.

    MACs are priced at each leaf module's weight precision, or at ``compute_dtype`` for all of
    them when given (weight-only quantization computes in float). Pass ``flops`` to reuse a count.
    """
    require_module(model, "estimate_energy")
    dev = device_for(model, device)
    flops = flops if flops is not None else count_flops(model, example, dev)
    with prepared(model, example, dev) as (args, kwargs), Tracer(model, dev) as tracer:
        with torch.inference_mode():
            model(*args, **kwargs)
    activation_bytes = sum(tracer.records[name].io_bytes for name in tracer.leaves())

    fallback = precision_of(compute_dtype) if compute_dtype is not None else _main_precision(model)
    by_precision: dict[str, int] = {}
    for name, macs in flops.by_leaf.items():
        if compute_dtype is not None:
            key = fallback
        else:
            dtype = _weight_dtype(model.get_submodule(name))
            key = precision_of(dtype) if dtype is not None else fallback
        by_precision[key] = by_precision.get(key, 0) + macs
    by_precision[fallback] = by_precision.get(fallback, 0) + flops.outside_leaves
    by_precision = {k: v for k, v in by_precision.items() if v}

    weight_bytes = state_bytes(model)
    pj_compute = sum(MAC_PJ[k] * macs for k, macs in by_precision.items())
    pj_weights = weight_bytes / 4 * DRAM_READ_32BIT_PJ
    pj_activations = activation_bytes / 4 * SRAM_READ_32BIT_PJ
    mj = 1e-9  # 1 pJ = 1e-9 mJ
    return Energy(total_mj=(pj_compute + pj_weights + pj_activations) * mj, compute_mj=pj_compute * mj,
                  weights_mj=pj_weights * mj, activations_mj=pj_activations * mj, macs_by_precision=by_precision,
                  weight_bytes=weight_bytes, activation_bytes=activation_bytes)


def _has_iinfo(dtype: torch.dtype) -> bool:
    try:
        torch.iinfo(dtype)
        return True
    except TypeError:
        return False


def _weight_dtype(mod: nn.Module) -> torch.dtype | None:
    """dtype of a module's weight: its stored integers for a quantized layer, ``.weight`` (a tensor, or a
    method on torch's quantized modules), else its first tensor."""
    if isinstance(mod, QuantizedLayer):
        return mod.qweight.dtype
    weight = getattr(mod, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        try:
            weight = weight()
        except Exception:  # noqa: BLE001 - a method that is not a weight getter
            weight = None
    if isinstance(weight, torch.Tensor):
        return weight.dtype
    first = next(iter(list(mod.parameters()) + list(mod.buffers())), None)
    return None if first is None else first.dtype


def _main_precision(model: nn.Module) -> str:
    """Precision holding the most bytes of the model's parameters (fp32 if it has none)."""
    bytes_by: dict[str, int] = {}
    for p in model.parameters():
        key = precision_of(p.dtype)
        bytes_by[key] = bytes_by.get(key, 0) + p.numel() * p.element_size()
    return max(bytes_by, key=bytes_by.__getitem__) if bytes_by else "fp32"
