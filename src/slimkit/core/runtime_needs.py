"""What a quantized layer needs from the runtime that serves it: the small contract between the
layers techniques produce and the runtimes (torch, ONNX Runtime, CUDA) that run them.

Runtimes never import techniques. They find quantized layers by this protocol, read what each needs
(integer weights of some width and grouping, how its inputs are quantized) and either build a
kernel for it or refuse with the reason the layer itself gives.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, runtime_checkable

import torch
import torch.nn as nn

RUNTIMES = ("torch", "onnxruntime", "cuda")


@dataclasses.dataclass(frozen=True)
class LayerNeeds:
    """The integer form of one layer and which runtimes can run it."""

    op: str                      # "linear" | "conv2d"
    weight_bits: int             # 8 | 4
    group_size: int              # inputs per int4 scale/zero; 0 = one scale per output channel
    activations: str             # "none" (weight-only) | "dynamic" | "static" int8 inputs
    per_channel: bool = True
    symmetric_activations: bool = True
    #: runtime -> why it cannot run this layer (a runtime not named here can).
    unsupported: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def runs_on(self, runtime: str) -> bool:
        return runtime not in self.unsupported


@runtime_checkable
class QuantizedLayer(Protocol):
    """A layer holding packed integer weights (``qweight``, ``weight_scale``, ``weight_zero`` for int4)."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor

    def runtime_needs(self) -> LayerNeeds: ...

    def dequantized_weight(self) -> torch.Tensor: ...

    def to_float(self) -> nn.Module: ...

    def act_range(self) -> tuple[float, float]: ...


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Every layer of ``model`` that follows :class:`QuantizedLayer`, by name."""
    return {n: m for n, m in model.named_modules() if n and isinstance(m, QuantizedLayer)}  # type: ignore[misc]
