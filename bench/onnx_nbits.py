"""Weight-only int4 / int8 on ONNX Runtime (MatMulNBits) against fp32 ORT and torch's weight-only kernels.

A MiniLM-size linear stack (6 blocks of q, k, v, o 384x384, up 384x1536, down 1536x384; no
attention, so the Linear layers are all that runs), quantized by slimkit's ``WeightOnly`` and built on
each backend by ``slimkit.runtime.build``. Interleaved median ms per call (the ORT builds and the torch
builds in separate groups), on 1 x 1 and 1 x 128 tokens; also each build's max error against the float
model carrying the dequantized weights.
Writes bench/results/onnx_nbits.json.

    .venv/bin/python bench/onnx_nbits.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import environment, interleaved_medians, write  # bench/ is on sys.path when run as a script
from torch import nn

import slimkit as sk
from slimkit.runtime import build, ort_plan

HIDDEN, FFN, BLOCKS = 384, 1536, 6
TOKENS = {"1x1": (1, 1), "1x128": (1, 128)}


def stack() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(BLOCKS):
        layers += [nn.Linear(HIDDEN, HIDDEN) for _ in range(4)] + [nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)]
    model = nn.Sequential(*layers).eval()
    for m in model:
        nn.init.normal_(m.weight, std=m.in_features ** -0.5)  # keeps activations O(1) through 36 layers
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = stack()
    configs = {"int4 g32": sk.quantize.WeightOnly(bits=4, group_size=32),
               "int4 g128": sk.quantize.WeightOnly(bits=4, group_size=128), "int8": sk.quantize.WeightOnly(bits=8)}
    rows = {}
    for shape, (b, t) in TOKENS.items():
        x = torch.randn(b, t, HIDDEN)
        runs = {"fp32 torch": base, "fp32 onnxruntime": build(base, "onnxruntime", (x,), threads=args.threads)}
        errors = {}
        for name, cfg in configs.items():
            q = cfg.apply_to(copy.deepcopy(base), None)
            reference = ort_plan(q)[0]  # the float model with the dequantized weights: what the integers mean
            with torch.inference_mode():
                want = reference(x)
            for backend in ("torch", "onnxruntime"):
                runnable = build(q, backend, (x,), threads=args.threads)
                with torch.inference_mode():
                    got = runnable(x)
                errors[f"{name} {backend}"] = float((got - want).abs().max() / want.abs().max())
                runs[f"{name} {backend}"] = runnable
        rows[shape] = {}
        for runtime in ("onnxruntime", "torch"):  # one group per runtime: ORT's spinning threads would slow torch's
            group = {k: r for k, r in runs.items() if k.endswith(runtime)}
            with torch.inference_mode():
                times = interleaved_medians({k: (lambda r=r: r(x)) for k, r in group.items()},
                                            rounds=3 if args.quick else 7, min_time_s=0.1 if args.quick else 0.3)
            fp32 = times[f"fp32 {runtime}"]["median_ms"]
            rows[shape] |= {k: {**v, "speedup_vs_fp32_same_runtime": fp32 / v["median_ms"],
                                "max_rel_error": errors.get(k, 0.0)} for k, v in times.items()}
        print(shape, {k: f"{v['median_ms']:.2f}ms x{v['speedup_vs_fp32_same_runtime']:.2f} err {v['max_rel_error']:.1e}"
                      for k, v in rows[shape].items()}, flush=True)
    write("onnx_nbits", {"environment": environment(args.threads), "stack": f"{BLOCKS} x (4 x {HIDDEN}x{HIDDEN}, "
                         f"{HIDDEN}x{FFN}, {FFN}x{HIDDEN})", "rows": rows,
                         "note": "max_rel_error: max |out - float model with the dequantized weights| / max |that|"})


if __name__ == "__main__":
    main()
