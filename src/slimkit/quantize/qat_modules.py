"""Fake-quantized Linear / Conv2d for quantization-aware training, and their conversion to the
integer modules PTQ produces (``QuantLinear`` / ``QuantConv2d``).

Weights: int8 symmetric per output channel (``q`` in [-127, 127]), int4 asymmetric per group
(``q`` in [0, 15], float zero point), the formats of ``pack.py``, or int4 symmetric with one step
per tensor (``q`` in [-8, 7], LSQ's setting; convolutions too), stored as ``BitLinear`` /
``BitConv2d`` 4-bit codes. Its starting step is the one of least weight MSE over clip fractions
of max|w| (a stronger PTQ than max-abs). Activations: static int8 with
the calibrated scale / zero point (``pack.act_qparams``), per-batch dynamic, or none. With
``learn_scale`` the steps are LSQ parameters, stored as logarithms (1-D, so AdamW neither decays
them nor moves a 0.01 step by its full learning rate in one update). A learned int8 weight step
never exceeds ``max|w| / 127``: the channel's largest weight then sits on level ±127, so the
runtimes that re-derive int8 weights by max-abs (ONNX Runtime's QDQ writer) get the same integers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.formats import pack
from slimkit.quantize._ste import fake_quant, lsq
from slimkit.quantize.extreme_modules import BitConv2d, BitLinear, int4_stored
from slimkit.quantize.modules import QuantConv2d, QuantLinear, _explicit_padding

_TINY = torch.finfo(torch.float32).tiny
INT4_SYM = (-8, 7)  # per-tensor symmetric int4 levels
CLIP_GRID = torch.linspace(0.2, 1.0, 81)  # clip fractions of max|w| searched for the per-tensor step


@torch.no_grad()
def mse_step(w: torch.Tensor, qmin: int = INT4_SYM[0], qmax: int = INT4_SYM[1]) -> torch.Tensor:
    """The per-tensor step ``s = f * max|w| / qmax`` with the least ``|round(w/s)*s - w|^2`` over ``CLIP_GRID``."""
    flat = w.detach().float().flatten()  # (W,)
    amax = flat.abs().max().clamp_min(_TINY)
    steps = CLIP_GRID.to(flat.device) * amax / qmax  # (F,)
    errors = torch.stack([((flat / s).round().clamp(qmin, qmax) * s - flat).pow(2).sum() for s in steps])  # (F,)
    return steps[int(errors.argmin())].reshape(1)  # (1,)


class WeightQuantizer(nn.Module):
    """Fake quantization of one weight (N, ...) to int8 per channel or int4 per group."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int, learn: bool, per_tensor: bool = False) -> None:
        super().__init__()
        self.bits, self.learn, self.per_tensor = bits, learn, per_tensor
        n = weight.shape[0]
        w = weight.detach().float()
        if per_tensor:
            if bits != 4:
                raise SlimkitError("per-tensor weight steps are for int4", "use bits=4 with per_tensor")
            self.group_size = 0
            if learn:
                self.log_step = nn.Parameter(mse_step(w).log())  # (1,)
        elif bits == 8:
            self.group_size = 0
            scale = self._int8_scale(w)
            if learn:
                self.log_step = nn.Parameter(scale.log())  # (N,)
        else:
            self.group_size = pack.check_int4_shape(w.shape[1], group_size)
            scale, zero = self._int4_params(w)
            if learn:
                self.log_step = nn.Parameter(scale.flatten().log())  # (N*G,)
                self.zero = nn.Parameter(zero.flatten())  # (N*G,)
        self.shape = (n, -1)

    @staticmethod
    def _int8_scale(w: torch.Tensor) -> torch.Tensor:
        amax = w.abs().flatten(1).amax(1)  # (N,)
        return torch.where(amax > 0, (amax / pack.INT8_MAX).clamp_min(_TINY), torch.ones_like(amax))

    def _int4_params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wg = w.reshape(w.shape[0], -1, self.group_size)  # (N, G, g)
        lo, hi = wg.amin(-1), wg.amax(-1)  # (N, G)
        scale = torch.where(hi > lo, ((hi - lo) / pack.INT4_LEVELS).clamp_min(_TINY), torch.ones_like(lo))
        return scale, -lo / scale

    def params(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero) in use now: (N,) and None for int8; (N, G) each for int4; (1,) and None per tensor."""
        if self.per_tensor:
            return (self.log_step.exp() if self.learn else mse_step(w)), None
        if self.bits == 8:
            cap = self._int8_scale(w.detach())
            return (torch.minimum(self.log_step.exp(), cap) if self.learn else cap), None
        if self.learn:
            return self.log_step.exp().reshape(w.shape[0], -1), self.zero.reshape(w.shape[0], -1)
        return self._int4_params(w.detach())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.params(w)
        if self.per_tensor:
            if self.learn:
                return lsq(w, scale, 0.0, *INT4_SYM, w.numel())
            return fake_quant(w, scale, 0.0, *INT4_SYM)
        if self.bits == 8:
            view = (-1,) + (1,) * (w.ndim - 1)
            if self.learn:
                return lsq(w, scale.reshape(view), 0.0, -pack.INT8_MAX, pack.INT8_MAX, w[0].numel())
            return fake_quant(w, scale.reshape(view), 0.0, -pack.INT8_MAX, pack.INT8_MAX)
        wg = w.reshape(w.shape[0], -1, self.group_size)  # (N, G, g)
        s, z = scale[..., None], zero[..., None]  # (N, G, 1)
        out = (lsq(wg, s, z, 0, pack.INT4_LEVELS, self.group_size) if self.learn
               else fake_quant(wg, s, z, 0, pack.INT4_LEVELS))
        return out.reshape(w.shape)

    @torch.no_grad()
    def integers(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q, scale, zero) as the integer modules store them: int8 like ``w``, or packed int4 (N, K/2)."""
        scale, zero = self.params(w)
        if self.per_tensor:  # signed codes (N, K) and the step repeated per row (N,)
            q = torch.round(w / scale).clamp(*INT4_SYM).flatten(1).to(torch.int8)
            return q, scale.float().expand(w.shape[0]).clone(), None
        if self.bits == 8:
            q = torch.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1))).clamp(-127, 127).to(torch.int8)
            return q, scale.float(), None
        wg = w.reshape(w.shape[0], -1, self.group_size)
        q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, pack.INT4_LEVELS).to(torch.uint8)
        return pack.pack_int4(q.reshape(w.shape)), scale.float(), zero.float()


class ActQuantizer(nn.Module):
    """Fake quantization of a layer's input: ``"static"`` (calibrated, maybe learned), ``"dynamic"``, ``"none"``."""

    def __init__(self, mode: str, act_range: tuple[float, float] | None, symmetric: bool, learn: bool) -> None:
        super().__init__()
        self.mode, self.symmetric, self.learn = mode, symmetric, learn and mode == "static"
        self.qmin, self.qmax = pack.act_qrange(symmetric)
        if mode == "static":
            scale, zero = pack.act_qparams(*act_range, symmetric=symmetric)
            self.register_buffer("zero", zero.float())
            if self.learn:
                self.log_scale = nn.Parameter(scale.log().reshape(1))  # (1,)
            else:
                self.register_buffer("scale", scale.reshape(1))

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.log_scale.exp() if self.learn else self.scale), self.zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        if self.mode == "dynamic":
            scale, zero = pack.dynamic_act_qparams(x.detach(), 255)
            return fake_quant(x, scale, zero, 0, 255)
        scale, zero = self.current()
        if self.learn:
            return lsq(x, scale, zero, self.qmin, self.qmax, x[0].numel())
        return fake_quant(x, scale, zero, self.qmin, self.qmax)

    def act_range(self) -> tuple[float, float] | None:
        """The range that makes ``pack.act_qparams`` give back this scale and zero point."""
        if self.mode != "static":
            return None
        scale, zero = self.current()
        return pack.act_range_of(scale.detach().reshape(()), zero.round().int().reshape(()), self.symmetric)


class QATLinear(nn.Linear):
    """An ``nn.Linear`` whose input and weight are fake-quantized in every forward."""

    @classmethod
    def from_float(cls, layer: nn.Linear, *, bits: int, group_size: int, activations: str,
                   act_range: tuple[float, float] | None, symmetric: bool, learn: bool,
                   per_tensor: bool = False) -> QATLinear:
        m = cls(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            m.weight.copy_(layer.weight)
            if layer.bias is not None:
                m.bias.copy_(layer.bias)
        m.wq = WeightQuantizer(m.weight, bits, group_size, learn, per_tensor)
        m.aq = ActQuantizer(activations, act_range, symmetric, learn)
        return m.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.aq(x), self.wq(self.weight), self.bias)

    def convert(self) -> QuantLinear | BitLinear:
        """The integer ``QuantLinear`` (``BitLinear`` per tensor) holding exactly the integers this layer trained with."""
        if self.wq.per_tensor:
            return int4_stored(self, *self.wq.integers(self.weight.detach())[:2])
        q = QuantLinear(self.in_features, self.out_features, bias=self.bias is not None, bits=self.wq.bits,
                        group_size=self.wq.group_size, activations=self.aq.mode, symmetric_act=self.aq.symmetric)
        qw, scale, zero = self.wq.integers(self.weight.detach())
        return q._fill(qw, scale, self.bias, self.aq.act_range(), zero)


class QATConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (zero padding) with fake-quantized input and int8 per-channel (or int4 per-tensor) weight."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, *, activations: str, act_range: tuple[float, float] | None,
                   symmetric: bool, learn: bool, per_tensor: bool = False) -> QATConv2d:

        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                padding=_explicit_padding(conv), dilation=conv.dilation, groups=conv.groups,
                bias=conv.bias is not None)
        with torch.no_grad():
            m.weight.copy_(conv.weight)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        m.wq = WeightQuantizer(m.weight, 4 if per_tensor else 8, 0, learn, per_tensor)
        m.aq = ActQuantizer(activations, act_range, symmetric, learn)
        return m.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.aq(x), self.wq(self.weight), self.bias)

    def convert(self) -> QuantConv2d | BitConv2d:
        if self.wq.per_tensor:
            return int4_stored(self, *self.wq.integers(self.weight.detach())[:2])
        q = QuantConv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, groups=self.groups,
                        bias=self.bias is not None, activations=self.aq.mode, symmetric_act=self.aq.symmetric)
        qw, scale, _ = self.wq.integers(self.weight.detach())
        return q._fill(qw, scale, self.bias, self.aq.act_range())


def qat_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (QATLinear, QATConv2d))}


__all__ = ["ActQuantizer", "QATConv2d", "QATLinear", "WeightQuantizer", "mse_step", "qat_layers"]
