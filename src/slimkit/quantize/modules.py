"""QuantLinear / QuantConv2d: the stored form of a quantized layer, and how it runs on torch CPU.

Everything a layer needs lives in registered buffers (int8 or packed-uint8 ``qweight``, float32
``weight_scale``/``weight_zero``, float ``bias``, static ``act_scale``/``act_zero``), so a
safetensors state_dict plus ``module.spec()`` (a small JSON dict) rebuild it:
``build_quant_module(spec)`` (or ``QuantLinear.empty(spec)``), then ``load_state_dict``.
Kernel repacks are cached in a non-persistent attribute and dropped after a load.

The kernel is chosen once, at construction, by probing it on the layer's all-zero buffers;
``kernel`` names it and ``fallback_reason`` says in one line why a better one was not used.
Paths (numbers and reasons in ``_kernels``):

* weight-only int8/int4 Linear: torch's int8/int4 weight kernels (bf16 activations and output)
  up to ``DEQUANT_ABOVE_M`` rows, dequantize + fp32 GEMM above (faster there; same weights).
* dynamic int8: fbgemm ``quantized.linear_dynamic`` (Linear), oneDNN ``qconv2d_pointwise`` (Conv).
* static int8: an *accuracy emulation* on this backend unless the CPU has VNNI: activations are
  fake-quantized with the calibrated ``act_scale``/``act_zero`` (quantize -> clamp -> dequantize),
  then an fp32 matmul with the dequantized weight: the integer math, exact up to fp32 rounding.
  With VNNI the oneDNN integer kernels run. The integer static path
  for deployment is ONNX Runtime's.
* weight-only int8 Conv2d: dequantized fp32 conv (torch has no such kernel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import layer_class
from slimkit.formats import pack
from slimkit.quantize import _kernels
from slimkit.quantize._base import _QuantBase
from slimkit.quantize._kernels import DEQUANT_ABOVE_M, INT4_KERNEL_GROUPS

DEQUANT = "dequant-fp32"
EMULATED = "fake-quant+dequant-fp32"
NO_VNNI = ("int8 GEMM sums saturate int16 on this CPU (no VNNI) with full-range activations; static int8 is "
           "emulated by fake-quantized activations (integer static path: ONNX Runtime)")


@layer_class("QuantLinear")
class QuantLinear(_QuantBase):
    """A Linear with int8 (per-channel / per-tensor) or int4 (grouped) weights.

    ``activations``: ``"none"`` weight-only; ``"dynamic"`` int8 activations quantized per batch;
    ``"static"`` int8 activations with calibrated ``act_scale``/``act_zero`` (int4 is weight-only).
    Inputs (..., K) of any float dtype; output (..., N) in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True, bits: int = 8, group_size: int = 0,
                 activations: str = "none", per_channel: bool = True, symmetric_act: bool = True) -> None:
        super().__init__()
        if bits not in (8, 4):
            raise SlimkitError(f"bits={bits} is not supported", "use bits=8 or bits=4")
        if bits == 4 and activations != "none":
            raise SlimkitError("int4 weights are weight-only (float activations)", "use activations='none' or bits=8")
        if bits == 8 and group_size:
            raise SlimkitError("int8 weights have per-channel or per-tensor scales, not groups", "use group_size=0")
        n, k = out_features, in_features
        self.in_features, self.out_features, self.bits = k, n, bits
        self.per_channel = bool(per_channel) or bits == 4
        if bits == 8:
            self.group_size = 0
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8))  # (N, K)
            self.register_buffer("weight_scale", torch.ones(n if self.per_channel else 1))  # (N,) or (1,)
        else:
            self.group_size = pack.check_int4_shape(k, group_size)
            self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8))  # (N, K/2)
            self.register_buffer("weight_scale", torch.ones(n, k // self.group_size))  # (N, K/g)
            self.register_buffer("weight_zero", torch.zeros(n, k // self.group_size))  # (N, K/g)
        self.register_buffer("bias", torch.zeros(n) if bias else None)
        self._init_act(activations, symmetric_act)
        self._choose_kernels()

    @classmethod
    def from_float(cls, linear: nn.Linear, *, bits: int = 8, group_size: int = 0, activations: str = "none",
                   act_range: tuple[float, float] | None = None, per_channel: bool = True,
                   symmetric_act: bool = True,
                   int4: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> QuantLinear:
        """Quantize a float ``nn.Linear`` (its weight and bias are copied, the original is untouched).

        ``int4``: the weight's int4 ``(packed, scale, zero)`` already computed (e.g. by GPTQ)
        instead of rounded here."""
        if not isinstance(linear, nn.Linear):
            raise SlimkitError(f"QuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, bits=bits,
                group_size=group_size, activations=activations, per_channel=per_channel, symmetric_act=symmetric_act)
        if bits == 8:
            return m._fill(*pack.quantize_weight_int8(linear.weight, per_channel), linear.bias, act_range)
        q, scale, zero = int4 if int4 is not None else pack.quantize_weight_int4(linear.weight, m.group_size)
        return m._fill(q, scale, linear.bias, act_range, zero)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantLinear:
        """A module of ``spec``'s shape with placeholder buffers, to ``load_state_dict`` into."""
        keys = ("bias", "bits", "group_size", "activations", "per_channel", "symmetric_act")
        return cls(spec["in_features"], spec["out_features"], **{k: spec[k] for k in keys if k in spec})._finish()

    def spec(self) -> dict[str, Any]:
        """JSON-able description: with the state_dict it is everything needed to rebuild the layer."""
        return {"kind": "QuantLinear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size,
                "activations": self.activations, "per_channel": self.per_channel, "symmetric_act": self.symmetric_act}

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (N, K) weight the integers stand for."""
        if self.bits == 8:
            return pack.dequantize_int8(self.qweight, self.weight_scale)
        return pack.dequantize_int4(self.qweight, self.weight_scale, self.weight_zero)

    def to_float(self) -> nn.Linear:
        """An ``nn.Linear`` with the dequantized weight and the bias (what the ONNX exporter writes)."""
        return self._float_twin(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None))

    def _choose_kernels(self) -> None:
        probe = torch.zeros(1, self.in_features)  # (1, K)
        if self.activations == "dynamic":
            self._choose([("quantized.linear_dynamic", lambda: self._fbgemm(probe))], EMULATED)
        elif self.activations == "static":
            vnni = _kernels.cpu_has_vnni()
            self._choose([("onednn.qlinear_pointwise", lambda: self._onednn(probe))] if vnni else [], EMULATED)
            self.fallback_reason = self.fallback_reason if vnni else NO_VNNI
        elif self.bits == 4 and self.group_size not in INT4_KERNEL_GROUPS:
            self.kernel, self.fallback_reason = DEQUANT, f"the int4 kernel needs group_size in {INT4_KERNEL_GROUPS}"
        else:
            wo = "aten._weight_int8pack_mm" if self.bits == 8 else "aten._weight_int4pack_mm_for_cpu"
            self._choose([(wo, lambda: self._kernel_mm(probe))], DEQUANT)

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        """The weight-only int8/int4 torch kernel: (M, K) -> (M, N) float32."""
        if "w" not in self._cache:
            self._cache["w"] = (self._scales(self.out_features).to(torch.bfloat16) if self.bits == 8 else
                                _kernels.int4_prepack(self.qweight, self.weight_scale, self.weight_zero))
        if self.bits == 8:
            y = _kernels.int8_mm(x, self.qweight, self._cache["w"])
        else:
            y = _kernels.int4_mm(x, self._cache["w"], self.group_size)
        return y + self.bias if self.bias is not None else y

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        if "fbgemm" not in self._cache:
            self._cache["fbgemm"] = _kernels.fbgemm_prepack(self.qweight, self._scales(self.out_features), self.bias)
        return _kernels.fbgemm_dynamic(x, self._cache["fbgemm"])

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        if "onednn" not in self._cache:
            self._cache["onednn"] = _kernels.need("onednn", "qlinear_prepack")(self.qweight, None)
        u, scale, zero = self._quant_u8(x)
        return _kernels.onednn_linear(u, scale, zero, self._cache["onednn"], self._scales(self.out_features), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SlimkitError(f"QuantLinear expects (..., {self.in_features}) inputs, got {tuple(x.shape)}")
        x2 = x.reshape(-1, self.in_features).float()  # (M, K)
        on_cpu = x2.device.type == "cpu"
        if self.kernel == "quantized.linear_dynamic" and on_cpu:
            y = self._fbgemm(x2)
        elif self.kernel == "onednn.qlinear_pointwise" and on_cpu:
            y = self._onednn(x2)
        elif self.kernel.startswith("aten.") and on_cpu and x2.shape[0] <= DEQUANT_ABOVE_M[self.bits]:
            y = self._kernel_mm(x2)
        else:  # dequantized fp32: exact emulation of the integer math for "dynamic"/"static"
            y = F.linear(self._fake_quant(x2), self.dequantized_weight(), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)  # (..., N)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding_mode != "zeros":
        raise SlimkitError(f"QuantConv2d supports zero padding only, not padding_mode={conv.padding_mode!r}",
                           "exclude this layer from quantization")
    if not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        raise SlimkitError("padding='same' with an even kernel pads asymmetrically; QuantConv2d cannot",
                           "use explicit padding or exclude this layer")
    return (total[0] // 2, total[1] // 2)


@layer_class("QuantConv2d")
class QuantConv2d(_QuantBase):
    """A Conv2d with symmetric int8 weights (O, C/groups, kh, kw), per output channel or per tensor.

    Runs oneDNN's integer conv where it is exact (dynamic activations; static with VNNI), else a
    dequantized fp32 conv (with fake-quantized activations for "dynamic"/"static").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, activations: str = "none",
                 per_channel: bool = True, symmetric_act: bool = True) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise SlimkitError(f"groups={groups} does not divide channels {in_channels}->{out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.per_channel = bool(per_channel)
        kh, kw = self.kernel_size
        self.register_buffer("qweight", torch.zeros(out_channels, in_channels // groups, kh, kw, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels if self.per_channel else 1))  # (O,) or (1,)
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self._init_act(activations, symmetric_act)
        probe = torch.zeros(1, in_channels, *(d * (k - 1) + 1 for d, k in zip(self.dilation, self.kernel_size)))
        onednn = [("onednn.qconv2d_pointwise", lambda: self._onednn(probe))]
        if activations == "none":
            self._choose([], DEQUANT)
            self.fallback_reason = "no int8 conv kernel in torch backend; runs on ONNX Runtime"
        elif activations == "dynamic" or _kernels.cpu_has_vnni():
            self._choose(onednn, EMULATED)
        else:
            self._choose([], EMULATED)
            self.fallback_reason = NO_VNNI

    @classmethod
    def from_float(cls, conv: nn.Conv2d, *, activations: str = "none", act_range: tuple[float, float] | None = None,
                   per_channel: bool = True, symmetric_act: bool = True) -> QuantConv2d:
        """Quantize a float ``nn.Conv2d`` to int8 weights (the original is untouched)."""
        if not isinstance(conv, nn.Conv2d):
            raise SlimkitError(f"QuantConv2d.from_float needs an nn.Conv2d, got {type(conv).__name__}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=_explicit_padding(conv), dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None, activations=activations, per_channel=per_channel,
                symmetric_act=symmetric_act)
        return m._fill(*pack.quantize_weight_int8(conv.weight, per_channel), conv.bias, act_range)

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantConv2d:
        """A module of ``spec``'s shape with placeholder buffers, to ``load_state_dict`` into."""
        keys = ("stride", "padding", "dilation", "groups", "bias", "activations", "per_channel", "symmetric_act")
        return cls(spec["in_channels"], spec["out_channels"], tuple(spec["kernel_size"]),
                   **{k: tuple(spec[k]) if isinstance(spec[k], list) else spec[k] for k in keys if k in spec})._finish()

    def spec(self) -> dict[str, Any]:
        """JSON-able description: with the state_dict it is everything needed to rebuild the layer."""
        return {"kind": "QuantConv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None, "bits": 8,
                "activations": self.activations, "per_channel": self.per_channel, "symmetric_act": self.symmetric_act}

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (O, C/groups, kh, kw) weight the integers stand for."""
        return pack.dequantize_int8(self.qweight, self.weight_scale)

    def to_float(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the dequantized weight and the bias."""
        return self._float_twin(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.groups, bias=self.bias is not None))

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        geometry = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        scales = self._scales(self.out_channels)
        if "onednn" not in self._cache:
            self._cache["onednn"] = _kernels.onednn_conv_prepack(self.qweight, scales, geometry)
        u, scale, zero = self._quant_u8(x)
        return _kernels.onednn_conv(u, scale, zero, self._cache["onednn"], scales, self.bias, geometry)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            raise SlimkitError(f"QuantConv2d expects (B, {self.in_channels}, H, W) inputs, got {tuple(x.shape)}")
        x4 = (x if x.dim() == 4 else x.unsqueeze(0)).float()  # (B, C, H, W)
        if self.kernel == "onednn.qconv2d_pointwise" and x4.device.type == "cpu":
            y = self._onednn(x4.contiguous())
        else:
            y = F.conv2d(self._fake_quant(x4), self.dequantized_weight(), self.bias, self.stride, self.padding,
                         self.dilation, self.groups)
        return (y if x.dim() == 4 else y.squeeze(0)).to(x.dtype)  # (B, O, H', W')


def build_quant_module(spec: dict[str, Any]) -> QuantLinear | QuantConv2d:
    """An empty QuantLinear / QuantConv2d from ``module.spec()``, ready for ``load_state_dict``."""
    kinds = {"QuantLinear": QuantLinear, "QuantConv2d": QuantConv2d}
    if not isinstance(spec, dict) or spec.get("kind") not in kinds:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise SlimkitError(f"unknown quantized module kind {kind!r}", f"expected one of {sorted(kinds)}")
    try:
        return kinds[spec["kind"]].empty(spec)
    except (KeyError, TypeError) as exc:
        raise SlimkitError(f"quantized module spec {spec} is incomplete or malformed ({exc})",
                           "save the spec with module.spec()") from None
