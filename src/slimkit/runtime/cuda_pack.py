"""Weight and activation layouts for the GPU kernels: pure tensor functions, one place per device.

What each kernel wants (checked against the torch sources of the versions slimkit supports):

* int8 (``torch._int_mm``): int8 (M, K) @ int8 (K, N) -> int32. Weights symmetric per output row
  (``slimkit.formats.pack`` int8), activations symmetric per token row, both in [-127, 127];
  ``y = acc * x_scale (M, 1) * w_scale (1, N)``. CUDA needs M > 16 and K, N multiples of 8.
* fp8 e4m3 (``torch._scaled_mm``): fp8 (M, K) row-major @ fp8 (K, N) column-major with float32
  row-wise scales ``scale_a`` (M, 1) and ``scale_b`` (1, N); ``x ≈ q * scale``, ``scale = amax / 448``.
  CUDA needs K, N multiples of 16 and compute capability >= 8.9 for row-wise scales.
* int4 tinygemm (``aten._weight_int4pack_mm``): bf16 (M, K) activations, weights asymmetric per
  group of 32/64/128/256 inputs. The kernel dequantizes ``(q - 8) * scale + zero``; slimkit's int4
  format means ``(q - z) * scale``, so ``zero = (8 - z) * scale``; ``scales_and_zeros`` is bf16
  (K/g, N, 2). The packed weight differs per device:
  - CUDA ``_convert_weight_to_int4pack(uint8 (N, K/2), inner_k_tiles)``: byte j holds element 2j in
    its *high* nibble and 2j+1 in its low one (slimkit packs the other way round, ONNX order);
    needs N % 8 == 0 and K % (16 * inner_k_tiles) == 0.
  - CPU ``_convert_weight_to_int4pack_for_cpu(int32 (N, K), 2)`` with ``_weight_int4pack_mm_for_cpu``.
"""

from __future__ import annotations

import torch

from slimkit.formats import pack

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127
INT4_GROUPS = (32, 64, 128, 256)  # group sizes the tinygemm kernels are built for


def _scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    # All-zero rows get scale 1 (they quantize to exact zeros); tiny rows stay representable.
    return torch.where(amax > 0, amax / top, torch.ones_like(amax)).clamp_min(1e-12)


# -- int8 ------------------------------------------------------------------------------------------

def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), float32 scale (N,)), symmetric per output row (slimkit's int8 format)."""
    return pack.quantize_weight_int8(w, per_channel=True)


def int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (int8 (M, K), float32 scale (M, 1)): per-token dynamic activations."""
    xf = x.float()
    scale = _scale(xf.abs().amax(dim=1, keepdim=True), INT8_MAX)  # (M, 1)
    q = torch.round(xf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq_t: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> (M, N) ``out_dtype``, rescaled by (M, 1) and (1, N) scales."""
    acc = torch._int_mm(xq, wq_t)  # (M, N) int32
    return (acc.float() * x_scale * w_scale).to(out_dtype)


# -- fp8 -------------------------------------------------------------------------------------------

def fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C) float -> (float8_e4m3fn (R, C), float32 scale (R, 1)), one scale per row."""
    tf = t.float()
    scale = _scale(tf.abs().amax(dim=1, keepdim=True), FP8_MAX)  # (R, 1)
    q = (tf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale_row: torch.Tensor,
               out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """fp8 (M, K) x fp8 weight (N, K) -> (M, N): ``wq.t()`` is the column-major (K, N) operand."""
    return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale_row, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


# -- int4 ------------------------------------------------------------------------------------------

def int4_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> slimkit's int4 format: (uint8 (N, K/2), scale (N, K/g), zero (N, K/g))."""
    return pack.quantize_weight_int4(w, group_size)


def swap_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """slimkit's order (element 2j low nibble) <-> the CUDA kernel's (element 2j high nibble)."""
    return ((packed & 0x0F) << 4) | (packed >> 4)


def inner_k_tiles(k: int) -> int | None:
    """Largest tinygemm ``inner_k_tiles`` (8, 4, 2) whose 16-wide k-tiles divide K; None if none does."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)


def int4_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(N, K/g) scale and slimkit zero point -> the kernels' bf16 (K/g, N, 2) [scale, zero] pairs."""
    scale = scale.float()
    shift = (8 - zero.float()) * scale  # (q - 8) * scale + shift == (q - zero) * scale
    return torch.stack([scale.t(), shift.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)


def int4_kernel_weight(packed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """slimkit (N, K/2) nibbles -> the int4 kernel's weight layout on ``device`` (the one per-device branch)."""
    if device.type == "cuda":
        k = packed.shape[1] * 2
        tiles = inner_k_tiles(k)
        if tiles is None:
            raise ValueError(f"K={k} is not a multiple of 32")
        cuda_bytes = swap_nibbles(packed).to(device).contiguous()  # (N, K/2) uint8, even element high
        return torch.ops.aten._convert_weight_to_int4pack(cuda_bytes, tiles)
    q = pack.unpack_int4(packed).to(torch.int32)  # (N, K)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(device), 2)


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """bf16 (M, K) -> bf16 (M, N) through the device's tinygemm kernel."""
    x = x.to(torch.bfloat16).contiguous()
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)


def dequantize_int4_kernel_form(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What the kernels compute from unpacked q (N, K) in [0, 15] and (K/g, N, 2): ``(q - 8) * s + z``,
    in ``dtype`` arithmetic (bf16: a prefill's per-call weight, as the int4 kernels see it)."""
    n = q.shape[0]
    sz = scales_and_zeros.to(dtype)
    s, z = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)  # (N, K/g, 1) each
    return ((q.view(n, -1, group_size).to(dtype) - 8) * s + z).view(n, -1)  # (N, K)
