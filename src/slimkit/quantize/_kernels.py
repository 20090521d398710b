"""The torch CPU integer kernels behind QuantLinear / QuantConv2d: lookup, repacking, calls.

Every op is looked up through ``op()`` (None where a torch build lacks it), so a module can
probe a kernel once and fall back with a reason. Measured on a 2-core AVX2 CPU without VNNI,
torch 2.13 (medians, ``bench/kernels_cpu.py`` -> ``bench/results/kernels_cpu.json``):

* ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu`` run ~10x slower with fp32
  activations than with bf16 (K=384, N=1536, M=1: 0.92 ms fp32, 0.08-0.10 ms bf16, fp32
  ``nn.Linear`` 0.09 ms), so activations go in as bf16; the output comes back bf16 too (the pair
  costs ~51 dB SQNR of its own against the fp32 dequantized matmul).
  Even at M <= 8 they are only 0.7-1.3x fp32 here: weight-only int4/int8 is a size and memory
  win on this CPU, not a speed one. Above a few dozen rows they lose: see ``DEQUANT_ABOVE_M``.
* Dynamic int8 is the speed win: fbgemm ``linear_dynamic`` 1.3-2.1x fp32 at M >= 8 (1 thread);
  oneDNN's dynamic conv 1.4-1.7x on the mnist 16->32 and 32->64 convs (0.86x on the 1->16 one).
* The u8 x s8 pair sums of the x86 int8 GEMM/conv (fbgemm and oneDNN alike) saturate int16
  without VNNI: with full-range 8-bit activations a static kernel's output is wrong (36 dB vs
  the exact integer result). 7-bit activations (0..127) cannot saturate, so dynamic paths use
  them without VNNI, as torch.ao's ``reduce_range`` does.
* Conv: ``quantized.conv2d_dynamic`` gives wrong outputs (2-5 dB SQNR), ``quantized.conv2d``
  needs the deprecated quantized tensors and a calibrated output scale; ``onednn.qconv2d_pointwise``
  takes plain uint8/int8 tensors, returns fp32 and is exact (its prepack's x_scale is a hint only).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from slimkit.formats import pack

#: Rows (tokens) above which the weight-only kernels lose to dequantize + fp32 GEMM. Two 1-thread runs
#: (K=384 N=1536 / K=1536 N=384, median ms, kernel vs dequant+fp32): int8 M=16 0.73/0.85 and 1.59/1.64,
#: M=32 1.33/1.10 and 2.70/2.32; int4 g64 M=32 1.43/1.91 and 3.29/2.55 (a tie within noise), M=48
#: 2.10/2.11 and 4.80/3.39. At M=4096 the kernels take 2-2.4x fp32; dequant+fp32 is within 10% of fp32.
DEQUANT_ABOVE_M = {8: 16, 4: 32}
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


def op(namespace: str, name: str) -> Callable[..., Any] | None:
    """``torch.ops.<namespace>.<name>``, or None where this torch build lacks it."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def need(namespace: str, name: str) -> Callable[..., Any]:
    found = op(namespace, name)
    if found is None:
        raise RuntimeError(f"torch {torch.__version__} has no {namespace}.{name}")
    return found


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether the CPU has an int8 dot product accumulating in int32 (AVX512-VNNI, AVX-VNNI, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def dynamic_qmax() -> int:
    """Top level of per-batch uint8 activations: 255 with VNNI, 127 (cannot saturate) without."""
    return 255 if cpu_has_vnni() else 127


# -- weight-only -----------------------------------------------------------------------------------

def int8_mm(x: torch.Tensor, q: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """(M, K) float x (N, K) int8 -> (M, N) float32, bf16 activations."""
    return need("aten", "_weight_int8pack_mm")(x.to(torch.bfloat16), q, scale_bf16).float()


def int4_prepack(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (N, K/2) nibbles + (N, K/g) scale/zero -> the CPU kernel's weight and (K/g, N, 2) params."""
    q = pack.unpack_int4(packed).to(torch.int32)  # (N, K)
    kernel_weight = need("aten", "_convert_weight_to_int4pack_for_cpu")(q, 2)
    shift = (8 - zero) * scale  # the kernel computes (q - 8) * scale + shift == (q - zero) * scale
    scales_and_zeros = torch.stack([scale.t(), shift.t()], dim=-1)  # (K/g, N, 2)
    return kernel_weight, scales_and_zeros.to(torch.bfloat16).contiguous()


def int4_mm(x: torch.Tensor, prepacked: tuple[torch.Tensor, torch.Tensor], group_size: int) -> torch.Tensor:
    """(M, K) float -> (M, N) float32 through the int4 kernel, bf16 activations."""
    weight, scales_and_zeros = prepacked
    return need("aten", "_weight_int4pack_mm_for_cpu")(x.to(torch.bfloat16), weight, group_size,
                                                      scales_and_zeros).float()


# -- int8 activations ------------------------------------------------------------------------------

def fbgemm_prepack(q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """Prepacked weight for ``quantized.linear_dynamic`` (needs a qint8 tensor, deprecated in 2.13)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        qw = torch._make_per_channel_quantized_tensor(q, scales.double(), zeros, 0)
        return need("quantized", "linear_prepack")(qw, bias)


def fbgemm_dynamic(x: torch.Tensor, prepacked: Any) -> torch.Tensor:
    """(M, K) float32 -> (M, N) float32, activations quantized per batch inside fbgemm."""
    return need("quantized", "linear_dynamic")(x, prepacked, not cpu_has_vnni())


def onednn_linear(u: torch.Tensor, x_scale: float, x_zero: int, prepacked: torch.Tensor, scales: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """(M, K) uint8 x oneDNN-prepacked int8 -> (M, N) float32."""
    zeros = torch.zeros(scales.shape[0], dtype=torch.long)
    return need("onednn", "qlinear_pointwise")(u, x_scale, x_zero, prepacked, scales, zeros, bias,
                                               1.0, 0, torch.float32, "none", [], "")


def onednn_conv_prepack(q: torch.Tensor, scales: torch.Tensor, geometry: tuple) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    return need("onednn", "qconv_prepack")(q, scales, 1.0, 0, stride, padding, dilation, groups, None)


def onednn_conv(u: torch.Tensor, x_scale: float, x_zero: int, prepacked: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, geometry: tuple) -> torch.Tensor:
    """(B, C, H, W) uint8 x oneDNN-prepacked int8 -> (B, O, H', W') float32."""
    zeros = torch.zeros(scales.shape[0], dtype=torch.long)
    return need("onednn", "qconv2d_pointwise")(u, x_scale, x_zero, prepacked, scales, zeros, bias, *geometry,
                                               1.0, 0, torch.float32, "none", [], "")
