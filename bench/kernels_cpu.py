"""Time the torch CPU integer kernels behind QuantLinear / QuantConv2d against fp32.

Raw kernel calls first (what each op costs, incl. the activation casts/quantization it needs),
then the modules themselves (the path each one picks per call). Medians of repeated calls,
1 and 2 threads. Writes bench/results/kernels_cpu.json.

    .venv/bin/python bench/kernels_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import environment, interleaved_medians, write  # bench/ is on sys.path when run as a script
from torch import nn

from slimkit.formats import pack
from slimkit.quantize._kernels import cpu_has_vnni
from slimkit.quantize.modules import QuantConv2d, QuantLinear

LINEAR_SHAPES = [(384, 1536, 1), (384, 1536, 8), (384, 1536, 4096),
                 (1536, 384, 1), (1536, 384, 8), (1536, 384, 4096), (576, 128, 256)]  # (K, N, M)
SWEEP_M = (16, 32, 48, 64, 96, 128)  # where do the weight-only kernels start losing to dequant + fp32?
CONV_SHAPES = [(256, 1, 16, 28), (256, 16, 32, 14), (256, 32, 64, 7)]  # mnist convs: (B, C, O, H)


def measure(row: dict[str, object], variants: dict[str, Callable[[], object]], quick: bool) -> dict[str, object]:
    """``row`` plus median / min ms per variant and the median ratio to fp32 (> 1: faster than fp32)."""
    stats = interleaved_medians(variants, rounds=5 if quick else 9, min_time_s=0.05 if quick else 0.15)
    med = {name: st["median_ms"] for name, st in stats.items()}
    row = {**row, "median_ms": med, "min_ms": {name: st["min_ms"] for name, st in stats.items()},
           "ratio_vs_fp32": {name: med["fp32"] / t for name, t in med.items()}}
    print({k: v for k, v in row.items() if not isinstance(v, dict)},
          {name: f"{t:.3f}ms x{med['fp32'] / t:.2f}" for name, t in med.items()}, flush=True)
    return row


def linear_variants(k: int, n: int, m: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    w, b, x = torch.randn(n, k) / k ** 0.5, torch.randn(n), torch.randn(m, k)
    q8, s8 = pack.quantize_weight_int8(w)
    p4, s4, z4 = pack.quantize_weight_int4(w, 64)
    q4 = pack.unpack_int4(p4).to(torch.int32)
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    sz = torch.stack([s4.t(), ((8 - z4) * s4).t()], -1).contiguous()  # (K/g, N, 2)
    sz_bf, s8_bf = sz.bfloat16(), s8.bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(q8, s8.double(), torch.zeros(n, dtype=torch.long), 0)
    pk = torch.ops.quantized.linear_prepack(qw, b)
    ow = torch.ops.onednn.qlinear_prepack(q8, None)
    wz = torch.zeros(n, dtype=torch.long)

    def onednn_dyn7() -> torch.Tensor:  # per-batch uint8 [0, 127] activations, python-side quantization
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        s = ((hi - lo) / 127).clamp_min(1e-12)
        z = int(torch.round(-lo / s))
        u = torch.clamp(torch.round(x / s) + z, 0, 127).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(u, float(s), z, ow, s8, wz, b, 1.0, 0, torch.float32, "none", [], "")

    slow_fp32 = {  # ~100x slower than bf16 activations already at M=8: only timed at small M
        "int8pack_fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8) + b,
        "int4pack_fp32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed4, 64, sz) + b,
    } if m <= 8 else {}
    return {
        "fp32": lambda: F.linear(x, w, b),
        **slow_fp32,
        "int8pack_bf16": lambda: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8, s8_bf).float() + b,
        "int8_dequant_fp32": lambda: F.linear(x, pack.dequantize_int8(q8, s8), b),
        "int4pack_bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), packed4, 64,
                                                                            sz_bf).float() + b,
        "int4_dequant_fp32": lambda: F.linear(x, pack.dequantize_int4(p4, s4, z4), b),
        "dynamic_fbgemm_rr": lambda: torch.ops.quantized.linear_dynamic(x, pk, True),
        "dynamic_onednn_u7": onednn_dyn7,
    }


def conv_variants(bsz: int, c: int, o: int, h: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    conv = nn.Conv2d(c, o, 3, padding=1)
    x = torch.randn(bsz, c, h, h)
    static = QuantConv2d.from_float(conv, activations="static", act_range=(-4.0, 4.0))
    dynamic = QuantConv2d.from_float(conv, activations="dynamic")
    q8, s8 = pack.quantize_weight_int8(conv.weight)
    ow = torch.ops.onednn.qconv_prepack(q8, s8, 0.03, 128, [1, 1], [1, 1], [1, 1], 1, None)
    wz = torch.zeros(o, dtype=torch.long)

    def onednn_u8() -> torch.Tensor:
        u = torch.clamp(torch.round(x / 0.03) + 128, 0, 255).to(torch.uint8)
        return torch.ops.onednn.qconv2d_pointwise(u, 0.03, 128, ow, s8, wz, conv.bias, [1, 1], [1, 1], [1, 1], 1,
                                                 1.0, 0, torch.float32, "none", [], "")

    return {"fp32": lambda: conv(x),
            "int8_dequant_fp32": lambda: F.conv2d(x, pack.dequantize_int8(q8, s8), conv.bias, 1, 1),
            "onednn_qconv_u8": onednn_u8,
            "module_dynamic": lambda: dynamic(x), "module_static": lambda: static(x)}


def module_variants(k: int, n: int, m: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    lin, x = nn.Linear(k, n), torch.randn(m, k)
    mods = {"fp32": lin,
            "module_w8": QuantLinear.from_float(lin, bits=8),
            "module_w4_g64": QuantLinear.from_float(lin, bits=4, group_size=64),
            "module_dynamic": QuantLinear.from_float(lin, activations="dynamic"),
            "module_static": QuantLinear.from_float(lin, activations="static", act_range=(-4.0, 4.0))}
    return {name: (lambda mod=mod: mod(x)) for name, mod in mods.items()}


SWEEP_VARIANTS = ("fp32", "int8pack_bf16", "int8_dequant_fp32", "int4pack_bf16", "int4_dequant_fp32")


def run(quick: bool) -> dict[str, object]:
    rows, load_before = [], os.getloadavg()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for k, n, m in LINEAR_SHAPES:
                row = {"op": "linear", "threads": threads, "K": k, "N": n, "M": m}
                rows.append(measure({**row, "group": "kernel"}, linear_variants(k, n, m), quick))
                rows.append(measure({**row, "group": "module"}, module_variants(k, n, m), quick))
            for k, n in ((384, 1536), (1536, 384)):
                for m in SWEEP_M:
                    variants = {nm: fn for nm, fn in linear_variants(k, n, m).items() if nm in SWEEP_VARIANTS}
                    row = {"op": "linear", "group": "threshold-sweep", "threads": threads, "K": k, "N": n, "M": m}
                    rows.append(measure(row, variants, quick))
            for bsz, c, o, h in CONV_SHAPES:
                row = {"op": "conv2d", "group": "kernel", "threads": threads, "B": bsz, "C": c, "O": o, "H": h}
                rows.append(measure(row, conv_variants(bsz, c, o, h), quick))
    return {**environment(threads=0), "threads": [1, 2], "vnni": cpu_has_vnni(),
            "quantized_engine": torch.backends.quantized.engine,
            "load_average_before_after": [load_before[0], os.getloadavg()[0]],
            "note": "ratio_vs_fp32 > 1 means faster than fp32. Shared 2-core machine: with other work running, "
                    "2-thread calls stall for whole scheduler slices (~10 ms); read 1-thread medians first.",
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds per measurement")
    args = parser.parse_args()
    print("wrote", write("kernels_cpu", run(args.quick)))


if __name__ == "__main__":
    main()
