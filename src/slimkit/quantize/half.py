"""Layers whose weight is *stored* in float16 inside an otherwise float32 model (mixed precision's
16-bit choice): half the bytes of fp32, computed in the input's dtype (the weight is cast per call)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.registry import layer_class


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def conv_spec(conv: nn.Conv2d) -> dict[str, Any]:
    """The JSON-able geometry of a Conv2d: the spec a stored conv (half, bit-packed) is rebuilt from."""
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(conv.kernel_size), "stride": list(conv.stride),
            "padding": conv.padding if isinstance(conv.padding, str) else list(conv.padding),
            "dilation": list(conv.dilation), "groups": conv.groups, "bias": conv.bias is not None}


def conv_weight_shape(spec: dict[str, Any]) -> tuple[int, int, int, int]:
    """The (O, C/groups, kh, kw) weight shape of a ``conv_spec`` geometry."""
    kh, kw = spec["kernel_size"]
    return spec["out_channels"], spec["in_channels"] // spec["groups"], kh, kw


def spec_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                spec: dict[str, Any]) -> torch.Tensor:
    """``F.conv2d`` with a ``conv_spec`` geometry (lists from JSON become tuples)."""
    return F.conv2d(x, weight, bias, _tuple(spec["stride"]), _tuple(spec["padding"]),
                    _tuple(spec["dilation"]), spec["groups"])


class _Half(nn.Module):
    def _init_half(self, shape: tuple[int, ...], bias: bool) -> None:
        self.register_buffer("weight", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(shape[0]) if bias else None)

    @torch.no_grad()
    def _copy(self, layer: nn.Module) -> Any:
        self.weight.copy_(layer.weight.detach().half())
        if self.bias is not None:
            self.bias.copy_(layer.bias.detach().float())
        return self.eval()


@layer_class("HalfLinear")
class HalfLinear(_Half):
    """An ``nn.Linear`` with a float16 weight (N, K) and a float32 bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_half((out_features, in_features), bias)

    @classmethod
    def from_float(cls, layer: nn.Linear) -> HalfLinear:
        return cls(layer.in_features, layer.out_features, layer.bias is not None)._copy(layer)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> HalfLinear:
        return cls(spec["in_features"], spec["out_features"], spec["bias"]).eval()

    def spec(self) -> dict[str, Any]:
        return {"kind": "HalfLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": 16, "activations": "none"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


@layer_class("HalfConv2d")
class HalfConv2d(_Half):
    """An ``nn.Conv2d`` (zero padding) with a float16 weight and a float32 bias."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)
        self._init_half(conv_weight_shape(spec), spec["bias"])

    @classmethod
    def from_float(cls, conv: nn.Conv2d) -> HalfConv2d:
        return cls(conv_spec(conv))._copy(conv)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> HalfConv2d:
        return cls(spec).eval()

    def spec(self) -> dict[str, Any]:
        return {"kind": "HalfConv2d", **self._spec, "bits": 16, "activations": "none"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spec_conv2d(x, self.weight.to(x.dtype), self.bias, self._spec)


__all__ = ["HalfConv2d", "HalfLinear", "conv_spec", "conv_weight_shape", "spec_conv2d"]
