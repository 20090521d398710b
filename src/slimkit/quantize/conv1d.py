"""Conv1d as a (k, 1) Conv2d, so the 2-D integer conv kernels (oneDNN, ONNX Runtime's QLinearConv)
and every Conv2d quantizer take audio and sequence convolutions too.

``Conv1dAs2d`` holds a ``Conv2d`` named ``conv`` with the same weights; the quantizers then replace
that inner layer like any other Conv2d (``<name>.conv``). The wrapper is a registered layer class,
so artifacts reload it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimkit.core.editing import set_submodule
from slimkit.core.registry import layer_class


@layer_class("Conv1dAs2d")
class Conv1dAs2d(nn.Module):
    """Runs ``conv`` (a Conv2d with a (k, 1) kernel) on (B, C, L) or (C, L) inputs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.geometry = {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size,
                         "stride": stride, "padding": padding, "dilation": dilation, "groups": groups, "bias": bias}
        self.conv = nn.Conv2d(in_channels, out_channels, (kernel_size, 1), (stride, 1), (padding, 0), (dilation, 1),
                              groups, bias=bias)

    @classmethod
    def from_conv1d(cls, conv: nn.Conv1d) -> Conv1dAs2d:
        m = cls(**_geometry(conv))
        with torch.no_grad():
            m.conv.weight.copy_(conv.weight.detach().unsqueeze(-1))  # (O, C/g, k) -> (O, C/g, k, 1)
            if conv.bias is not None:
                m.conv.bias.copy_(conv.bias.detach())
        return m.to(conv.weight.device)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> Conv1dAs2d:
        return cls(**{k: v for k, v in spec.items() if k != "kind"})

    def spec(self) -> dict[str, Any]:  # the geometry, whatever ``conv`` has become (a quantized layer)
        return dict(self.geometry)

    @property
    def weight(self) -> torch.Tensor:
        """The Conv1d's float weight (O, C/g, k), for code that reads ``layer.weight``."""
        return self.conv.weight.squeeze(-1)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, L) or (C, L)
        return self.conv(x.unsqueeze(-1)).squeeze(-1)  # (B, O, L') or (O, L')


def liftable_reason(conv: nn.Conv1d) -> str:
    """Why ``conv`` cannot run as a Conv2d ("" when it can)."""
    if conv.padding_mode != "zeros":
        return f"Conv1d with padding_mode={conv.padding_mode!r} stays float (zero padding only)"
    if conv.padding == "same" and (conv.dilation[0] * (conv.kernel_size[0] - 1)) % 2:
        return "Conv1d with padding='same' and an even kernel pads asymmetrically: stays float"
    return ""


def lift_conv1d(model: nn.Module, name: str) -> str:
    """Replace the Conv1d ``name`` by a ``Conv1dAs2d``; the name of the Conv2d to quantize."""
    set_submodule(model, name, Conv1dAs2d.from_conv1d(model.get_submodule(name)))
    return f"{name}.conv"


def _geometry(conv: nn.Conv1d) -> dict[str, Any]:
    if conv.padding == "valid":
        padding = 0
    elif conv.padding == "same":
        padding = conv.dilation[0] * (conv.kernel_size[0] - 1) // 2
    else:
        padding = conv.padding[0]
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size[0],
            "stride": conv.stride[0], "padding": padding, "dilation": conv.dilation[0], "groups": conv.groups,
            "bias": conv.bias is not None}
