"""Weight-only int8 / int4 for ConvTranspose1d/2d (decoders, detection and segmentation heads).

Neither torch nor ONNX Runtime has an integer transposed-conv kernel slimkit can reach, so these
layers are stored as integers and dequantized on each call: the artifact shrinks 4x (int8) or 8x
(int4), the speed is the float layer's. Scales are symmetric, one per input channel (the weight's
first axis: ``(C_in, C_out / groups, *kernel)``), rounded to nearest.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.registry import layer_class
from slimkit.quantize.row_codes import decode_rows, empty_codes, encode_rows
from slimkit.core.editing import select, set_submodule

TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)


@layer_class("QuantConvTranspose")
class QuantConvTranspose(nn.Module):
    """A ConvTranspose1d/2d whose weight is stored as int8 or packed int4 codes with per-row scales."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.shape = (spec["in_channels"], spec["out_channels"] // spec["groups"], *spec["kernel_size"])
        rows, cols = self.shape[0], math.prod(self.shape[1:])
        self.bits = spec["bits"]
        self.register_buffer("codes", empty_codes(rows, cols, self.bits))  # (C_in, K) int8 or (C_in, K/2) packed
        self.register_buffer("scale", torch.ones(rows))                      # (C_in,)
        self.register_buffer("bias", torch.zeros(spec["out_channels"]) if spec["bias"] else None)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantConvTranspose:
        return cls(spec).eval()

    @classmethod
    def from_float(cls, layer: nn.modules.conv._ConvTransposeNd, bits: int) -> QuantConvTranspose:
        spec = {"dims": len(layer.kernel_size), "in_channels": layer.in_channels, "out_channels": layer.out_channels,
                "kernel_size": list(layer.kernel_size), "stride": list(layer.stride), "padding": list(layer.padding),
                "output_padding": list(layer.output_padding), "groups": layer.groups,
                "dilation": list(layer.dilation), "bias": layer.bias is not None, "bits": bits}
        out = cls(spec)
        codes, scale = encode_rows(layer.weight.flatten(1), bits)  # weight (C_in, C_out/g, *k) -> (C_in, K)
        with torch.no_grad():
            out.codes.copy_(codes)
            out.scale.copy_(scale)
            if layer.bias is not None:
                out.bias.copy_(layer.bias.detach())
        return out.to(layer.weight.device).eval()

    def spec(self) -> dict[str, Any]:
        return {"kind": "QuantConvTranspose", **self._spec, "activations": "none"}

    @property
    def weight(self) -> torch.Tensor:
        """The float weight ``(C_in, C_out / groups, *kernel)`` the codes stand for."""
        return decode_rows(self.codes, self.scale, self.bits, math.prod(self.shape[1:])).reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._spec
        conv = F.conv_transpose1d if s["dims"] == 1 else F.conv_transpose2d
        return conv(x, self.weight.to(x.dtype), self.bias, s["stride"], s["padding"], s["output_padding"],
                    s["groups"], s["dilation"])


def transposed_targets(model: nn.Module, targets: Any, exclude: Any) -> list[str]:
    """The ConvTranspose1d/2d layers a quantizer's ``targets`` reach ("all": every one; "all-linear": none)."""
    if targets == "all-linear":
        return []
    return select(model, ".*" if targets == "all" else targets, exclude, kinds=TRANSPOSED)


def quantize_conv_transpose(model: nn.Module, names: list[str], bits: int,
                            skipped: dict[str, str]) -> dict[str, nn.Module]:
    """Replace each named transposed conv by its weight-only form; returns the originals by name."""
    originals = {}
    for name in names:
        layer = model.get_submodule(name)
        if layer.padding_mode != "zeros":
            skipped[name] = f"{type(layer).__name__} with padding_mode={layer.padding_mode!r} stays float"
            continue
        set_submodule(model, name, QuantConvTranspose.from_float(layer, bits))
        skipped.pop(name, None)
        originals[name] = layer
    return originals


__all__ = ["QuantConvTranspose", "TRANSPOSED", "quantize_conv_transpose", "transposed_targets"]
