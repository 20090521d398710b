"""Packed integer weight and activation formats: pure tensor functions, no modules, no kernels.

These are the formats a quantized layer is *stored* in (``QuantLinear`` / ``QuantConv2d``
buffers, saved as safetensors) and that the runtimes convert from. Each ``quantize_*`` has an
exact inverse ``dequantize_*``: dequantizing is the definition of what the integers mean.

int8 weights — symmetric, ``w ≈ q * scale``, ``q`` in [-127, 127] (never -128, so the format is
    symmetric and re-quantizing the dequantized weight with the same max-abs rule gives the same
    integers back), ``scale = max|w| / 127`` per output channel (N,) or per tensor (1,).
int4 weights — asymmetric per group of ``group_size`` input weights, ``w ≈ (q - zero) * scale``
    with ``q`` in [0, 15] and a *float* zero point ``zero = -min / scale`` (the group's min and
    max land exactly on levels 0 and 15). Two values per byte: element ``2j`` in the low nibble,
    ``2j + 1`` in the high nibble (ONNX ``MatMulNBits`` order). K that the group size does not
    divide is refused rather than padded, so packed bytes are always ``N * K / 2``.
activations — int8 symmetric (zero 0, ``scale = max(|lo|, |hi|) / 127``, values clamped to
    [-128, 127] as ONNX QuantizeLinear does) or uint8 asymmetric (range [0, 255], the range
    widened to include 0 so 0.0 is exact).
"""

from __future__ import annotations

import torch

from slimkit.core.errors import SlimkitError

INT8_MAX = 127
INT4_LEVELS = 15


def _per_row(t: torch.Tensor, ndim: int) -> torch.Tensor:
    # (N,) or (1,) -> (N, 1, ...) so it broadcasts against an ndim weight
    return t.reshape(-1, *([1] * (ndim - 1)))


def safe_scale(amax: torch.Tensor, levels: int) -> torch.Tensor:
    # An all-zero row gets scale 1 (dequantizes to exact zeros); tiny ranges stay representable.
    scale = (amax / levels).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_weight_int8(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: ``(q int8 like w, scale float32 (N,) or (1,))`` for (N, K) or (N, C, kh, kw)."""
    if w.ndim < 2 or not w.is_floating_point():
        raise SlimkitError(f"int8 weight quantization needs a float (N, K, ...) tensor, got {tuple(w.shape)} {w.dtype}",
                           "pass a Linear or Conv weight")
    w = w.detach().float()
    lo, hi = torch.aminmax(w.flatten(1), dim=1)  # (N,) each: max|w| (and NaN / Inf) without a copy of w
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise SlimkitError("weight contains NaN or Inf", "fix the model before quantizing it")
    amax = torch.maximum(-lo, hi) if per_channel else torch.maximum(-lo.amin(), hi.amax()).reshape(1)  # (N,) or (1,)
    scale = safe_scale(amax, INT8_MAX)
    rows = _per_row(scale, w.ndim)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    step = max(1, (1 << 20) // max(1, w[0].numel()))  # ~1M values at a time: an embedding table's float
    for i in range(0, w.shape[0], step):               # temporaries stay a few MB
        r = rows[i:i + step] if per_channel else rows
        q[i:i + step] = torch.round(w[i:i + step] / r).clamp(-INT8_MAX, INT8_MAX)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 weight of an int8 weight: ``q * scale`` broadcast per output channel."""
    return q.float() * _per_row(scale.float(), q.ndim)


def check_int4_shape(n_in: int, group_size: int) -> int:
    """The effective group size for K = ``n_in`` (0 means one group per row); raises if it cannot pack."""
    g = n_in if group_size == 0 else group_size
    if g <= 0 or g % 2 or n_in % g:
        raise SlimkitError(f"int4 weights need an even group size that divides K; K={n_in}, group_size={group_size}",
                           "use a group_size that divides the layer's input size (e.g. 32), or keep this layer int8")
    return g


def quantize_weight_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group: ``(packed uint8 (N, K/2), scale (N, K/g), zero (N, K/g))``."""
    if w.ndim != 2 or not w.is_floating_point():
        raise SlimkitError(f"int4 weight quantization needs a float (N, K) tensor, got {tuple(w.shape)} {w.dtype}",
                           "int4 is for Linear layers; keep convolutions int8")
    n, k = w.shape
    g = check_int4_shape(k, group_size)
    wg = w.detach().float().reshape(n, k // g, g)  # (N, K/g, g)
    if not torch.isfinite(wg).all():
        raise SlimkitError("weight contains NaN or Inf", "fix the model before quantizing it")
    lo, hi = wg.amin(-1), wg.amax(-1)  # (N, K/g)
    scale = safe_scale(hi - lo, INT4_LEVELS)
    zero = -lo / scale
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, INT4_LEVELS).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) uint8, element 2j low nibble, 2j+1 high nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 values in [0, 15]; the exact inverse of ``pack_int4``."""
    low, high = packed & 0x0F, packed >> 4  # (N, K/2) each
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float32 (N, K) weight of an int4 weight: ``(q - zero) * scale`` per group."""
    n, half = packed.shape
    groups = scale.shape[1]
    q = torch.empty(n, half, 2, dtype=torch.float32, device=packed.device)  # unpacked straight into float
    q[..., 0] = packed & 0x0F
    q[..., 1] = packed >> 4
    qg = q.view(n, groups, 2 * half // groups)  # (N, K/g, g)
    return qg.sub_(zero[..., None].float()).mul_(scale[..., None].float()).view(n, 2 * half)


# -- activations ---------------------------------------------------------------------------------

def act_qrange(symmetric: bool) -> tuple[int, int]:
    """Integer range of activations: int8 [-128, 127] when symmetric, uint8 [0, 255] otherwise."""
    return (-128, 127) if symmetric else (0, 255)


def act_qparams(lo: float, hi: float, symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale float32 (), zero int32 ())`` for a calibrated activation range ``[lo, hi]``.

    Computed in double and rounded once to float32, with the least scale float32 eps, exactly as
    ``calibrate.scale_zero_point`` (which the ONNX exporter uses), so both give the same numbers.
    """
    lo, hi = float(lo), float(hi)
    if not (lo <= hi) or not all(abs(v) < float("inf") for v in (lo, hi)):
        raise SlimkitError(f"activation range ({lo}, {hi}) is not a finite lo <= hi", "re-run calibration")
    eps = float(torch.finfo(torch.float32).eps)
    if symmetric:
        scale, zero = max(max(-lo, hi) / INT8_MAX, eps), 0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # 0.0 must be exact (padding, ReLU zeros)
        scale = max((hi - lo) / 255, eps)
        zero = int(min(max(round(-lo / scale), 0), 255))
    return torch.tensor(scale, dtype=torch.float32), torch.tensor(zero, dtype=torch.int32)


def act_range_of(scale: torch.Tensor, zero: torch.Tensor, symmetric: bool = True) -> tuple[float, float]:
    """A range ``(lo, hi)`` that ``act_qparams`` maps back to exactly ``(scale, zero)``."""
    s, z = float(scale), int(zero)
    return (-INT8_MAX * s, INT8_MAX * s) if symmetric else (-z * s, (255 - z) * s)


def quantize_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Float activations -> integer levels (still a float tensor): ``clamp(round(x / s) + z)``."""
    return torch.div(x, scale).round_().add_(zero).clamp_(qmin, qmax)  # one allocation: x may be large


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize -> clamp -> dequantize: the values an integer kernel would see, in float."""
    return quantize_act(x, scale, zero, qmin, qmax).sub_(zero).mul_(scale)


def dynamic_act_qparams(x: torch.Tensor, qmax: int = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch uint8 ``[0, qmax]`` params over ``[min(x, 0), max(x, 0)]`` (ONNX DynamicQuantizeLinear)."""
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    return scale, torch.round(-lo / scale)
