"""Binary and ternary layers: trainable (straight-through) and stored (bit-packed).

Training (``ExtremeLinear`` / ``ExtremeConv2d``), per output channel:

- binary (XNOR-Net): ``w_b = alpha * sign(w)``, ``alpha = mean|w|``; the gradient passes
  straight through ``sign`` where ``|w| <= 1`` (hard tanh) and reaches ``alpha`` as well.
- ternary (TWN threshold, TTQ scales): ``w_t = +Wp`` where ``w > delta``, ``-Wn`` where
  ``w < -delta``, else 0, with ``delta = 0.7 * mean|w|``; ``Wp``/``Wn`` are learned (stored as
  logarithms) and the latent weights get TTQ's gradient: ``Wp * g``, ``Wn * g`` or ``g`` by region.

Storage (``BitLinear`` / ``BitConv2d``): codes packed 8 (binary) or 4 (ternary) per byte plus two
float32 scales per output channel. The same modules hold 4-bit signed integer weights (QAT's
per-tensor int4, mixed precision's int4 convolutions): codes ``q + 8`` two per byte, ``scale_pos``
the step of each row (``scale_neg`` unused). There is no fast binary kernel on this CPU: ``forward``
unpacks the codes to a float weight and runs the ordinary float layer, so these layers are a
size win, not a speed one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import layer_class
from slimkit.formats.bitpack import pack_bits, packed_width, unpack_bits
from slimkit.formats.pack import pack_int4, unpack_int4
from slimkit.quantize.half import conv_spec, conv_weight_shape, spec_conv2d
from slimkit.quantize.row_codes import INT4_OFFSET, symmetric_rows  # 4-bit code = signed integer + 8

MODES = ("binary", "ternary")
_BITS = {"binary": 1, "ternary": 2}
STORED_BITS = (1, 2, 4)


def _width(k: int, bits: int) -> int:
    return (k + 1) // 2 if bits == 4 else packed_width(k, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes -> (N, bytes) uint8; 4-bit rows are padded to an even length with code 0."""
    if bits != 4:
        return pack_bits(codes, bits)
    n, k = codes.shape
    padded = torch.zeros(n, k + k % 2, dtype=torch.uint8, device=codes.device)  # (N, K rounded up to even)
    padded[:, :k] = codes
    return pack_int4(padded)


def _unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    return unpack_int4(packed)[:, :k] if bits == 4 else unpack_bits(packed, bits, k)


def _per_row(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))  # (N,) -> (N, 1, ...)


class _Extreme:
    """What the trainable binary / ternary Linear and Conv2d share."""

    weight: nn.Parameter

    def _init_extreme(self, mode: str, threshold: float) -> None:
        if mode not in MODES:
            raise SlimkitError(f"mode={mode!r} is not known", f"use one of {MODES}")
        self.mode, self.threshold = mode, float(threshold)
        if mode == "ternary":
            w = self.weight.detach().flatten(1)  # (N, K)
            delta = self.threshold * w.abs().mean(1, keepdim=True)  # (N, 1)
            pos, neg = w > delta, w < -delta
            wp = (w * pos).sum(1) / pos.sum(1).clamp_min(1)
            wn = (-w * neg).sum(1) / neg.sum(1).clamp_min(1)
            fallback = delta.squeeze(1).clamp_min(1e-8)
            self.log_wp = nn.Parameter(torch.where(wp > 0, wp, fallback).log())  # (N,)
            self.log_wn = nn.Parameter(torch.where(wn > 0, wn, fallback).log())  # (N,)

    def extreme_weight(self) -> torch.Tensor:
        """The binary / ternary weight (same shape as ``weight``) with straight-through gradients."""
        w = self.weight
        nd = w.ndim
        if self.mode == "binary":
            alpha = w.abs().flatten(1).mean(1)  # (N,)
            clipped = w.clamp(-1, 1)
            sign = clipped + (torch.where(w >= 0, 1.0, -1.0) - clipped).detach()
            return _per_row(alpha, nd) * sign
        delta = _per_row(self.threshold * w.detach().abs().flatten(1).mean(1), nd)
        pos, neg = (w.detach() > delta).to(w.dtype), (w.detach() < -delta).to(w.dtype)
        wp, wn = _per_row(self.log_wp.exp(), nd), _per_row(self.log_wn.exp(), nd)
        value = wp * pos - wn * neg
        factor = (wp * pos + wn * neg + (1 - pos - neg)).detach()  # TTQ's latent-weight gradient scale
        return value + w * factor - (w * factor).detach()

    @torch.no_grad()
    def codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (N, K) uint8, scale_pos (N,), scale_neg (N,)) of the stored layer."""
        w = self.weight.detach().flatten(1)  # (N, K)
        if self.mode == "binary":
            alpha = w.abs().mean(1)
            return (w >= 0).to(torch.uint8), alpha.clone(), alpha.clone()
        delta = self.threshold * w.abs().mean(1, keepdim=True)
        codes = torch.zeros_like(w, dtype=torch.uint8)
        codes[w > delta] = 1
        codes[w < -delta] = 2
        return codes, self.log_wp.exp().detach().clone(), self.log_wn.exp().detach().clone()


class ExtremeLinear(nn.Linear, _Extreme):
    @classmethod
    def from_float(cls, layer: nn.Linear, mode: str, threshold: float = 0.7) -> ExtremeLinear:
        m = cls(layer.in_features, layer.out_features, bias=layer.bias is not None).to(layer.weight.device)
        m.load_state_dict(layer.state_dict())
        m._init_extreme(mode, threshold)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.extreme_weight(), self.bias)

    def convert(self) -> BitLinear:
        out = BitLinear(self.in_features, self.out_features, bits=_BITS[self.mode], bias=self.bias is not None)
        return out.fill(*self.codes_and_scales(), self.bias)


class ExtremeConv2d(nn.Conv2d, _Extreme):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, mode: str, threshold: float = 0.7) -> ExtremeConv2d:
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode).to(conv.weight.device)
        m.load_state_dict(conv.state_dict())
        m._init_extreme(mode, threshold)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.extreme_weight(), self.bias)

    def convert(self) -> BitConv2d:
        spec = {**conv_spec(self), "bits": _BITS[self.mode]}
        return BitConv2d.empty(spec).fill(*self.codes_and_scales(), self.bias)


class _Bits(nn.Module):
    """Bit-packed codes + per-channel scales; the weight is rebuilt in float on every call."""

    def _init_bits(self, n: int, k: int, bits: int, bias: bool) -> None:
        if bits not in STORED_BITS:
            raise SlimkitError(f"bits={bits} is not a stored width of BitLinear/BitConv2d", "use 1, 2 or 4")
        self.rows, self.cols, self.bits = n, k, bits
        self.register_buffer("packed", torch.zeros(n, _width(k, bits), dtype=torch.uint8))  # (N, B)
        self.register_buffer("scale_pos", torch.ones(n))  # (N,)
        self.register_buffer("scale_neg", torch.ones(n))  # (N,)
        self.register_buffer("bias", torch.zeros(n) if bias else None)

    @torch.no_grad()
    def fill(self, codes: torch.Tensor, scale_pos: torch.Tensor, scale_neg: torch.Tensor,
             bias: torch.Tensor | None) -> Any:
        self.packed.copy_(_pack(codes, self.bits))
        self.scale_pos.copy_(scale_pos)
        self.scale_neg.copy_(scale_neg)
        if self.bias is not None:
            self.bias.copy_(bias.detach())
        return self.eval()

    def flat_weight(self) -> torch.Tensor:
        """The float (N, K) weight: binary code 1 -> +a, 0 -> -a; ternary 1 -> +Wp, 2 -> -Wn, 0 -> 0;
        4-bit ``(code - 8) * step``."""
        codes = _unpack(self.packed, self.bits, self.cols)  # (N, K)
        sp, sn = self.scale_pos[:, None], self.scale_neg[:, None]
        if self.bits == 4:
            return (codes.float() - INT4_OFFSET) * sp
        if self.bits == 1:
            return torch.where(codes == 1, sp, -sn)
        return torch.where(codes == 1, sp, torch.where(codes == 2, -sn, torch.zeros_like(sp)))

    @property
    def weight(self) -> torch.Tensor:
        """The float weight in the layer's own shape, for code that reads ``layer.weight`` (HF models
        read a patch embedding's dtype); the stored form stays the packed codes."""
        return self.flat_weight().reshape(getattr(self, "shape", (self.rows, self.cols)))


@layer_class("BitLinear")
class BitLinear(_Bits):
    """A Linear with binary (1 bit), ternary (2 bit) or signed 4-bit packed weights."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_bits(out_features, in_features, bits, bias)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> BitLinear:
        return cls(spec["in_features"], spec["out_features"], bits=spec["bits"], bias=spec["bias"]).eval()

    def spec(self) -> dict[str, Any]:
        return {"kind": "BitLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bits": self.bits, "bias": self.bias is not None, "activations": "none"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.flat_weight().to(x.dtype), self.bias)


@layer_class("BitConv2d")
class BitConv2d(_Bits):
    """A Conv2d with binary, ternary or signed 4-bit packed weights (O, C/groups * kh * kw)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.shape = conv_weight_shape(spec)  # (O, C/g, kh, kw)
        self._init_bits(self.shape[0], self.shape[1] * self.shape[2] * self.shape[3], spec["bits"], spec["bias"])

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> BitConv2d:
        return cls(spec).eval()

    def spec(self) -> dict[str, Any]:
        return {"kind": "BitConv2d", **self._spec, "activations": "none"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.flat_weight().reshape(self.shape).to(x.dtype)  # (O, C/g, kh, kw)
        return spec_conv2d(x, w, self.bias, self._spec)


def int4_stored(layer: nn.Module, codes: torch.Tensor, step: torch.Tensor) -> BitLinear | BitConv2d:
    """``layer`` (Linear / Conv2d) stored as signed 4-bit ``codes`` (N, K) in [-8, 7] times ``step`` (N,)."""
    if isinstance(layer, nn.Conv2d):
        out: BitLinear | BitConv2d = BitConv2d.empty({**conv_spec(layer), "bits": 4})
    else:
        out = BitLinear(layer.in_features, layer.out_features, bits=4, bias=layer.bias is not None)
    step = step.detach().float().reshape(-1)
    return out.fill((codes + INT4_OFFSET).to(torch.uint8), step, step, layer.bias)


def int4_per_channel(layer: nn.Module) -> BitLinear | BitConv2d:
    """Symmetric per-output-channel int4 (levels -7..7, step max|w|/7), rounded to nearest: convs'
    int4 form (their inputs per output rarely split into the groups Linear layers use)."""
    q, step = symmetric_rows(layer.weight.flatten(1), 4)  # (N, K), (N,)
    return int4_stored(layer, q, step)


__all__ = ["BitConv2d", "BitLinear", "ExtremeConv2d", "ExtremeLinear", "INT4_OFFSET", "MODES", "int4_per_channel", "int4_stored"]
