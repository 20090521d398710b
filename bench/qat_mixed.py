"""QAT vs PTQ, mixed vs uniform precision, binary/ternary vs int4: quality at measured artifact sizes.

mnist CNN and MiniLM, side by side in one process:
(a) PTQ int8 static vs QAT int8 static (both scored on ONNX Runtime's integer kernels);
(b) PTQ int4 vs QAT int4 weight-only (torch int4 kernels), grouped (g32) and per channel (g0);
(c) mixed precision {4, 8, 16} vs uniform at the same weight-byte budget: at the uniform int8 bytes,
    and halfway between uniform int4 and int8 (where the best uniform that fits is int4);
(d) mnist: binary / ternary (1-2 bit, packed) vs int4 at their artifact sizes.
Sizes are the bytes of the saved artifact (``slimkit.save``); quality is the task metric, plus the
output SQNR (mnist logits) or cosine to fp32 (MiniLM) to resolve differences the metric rounds away.
This benchmark measures quality and size, not speed (no latency is timed).

    .venv/bin/python bench/qat_mixed.py [--threads 1] [--mnist-steps 300] [--minilm-steps 40] [--skip-minilm]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.io import artifact_bytes  # noqa: E402
from slimkit.measure.sensitivity import weight_layers  # noqa: E402
from slimkit.quantize import Binary, Int8, Mixed, QAT, QuantLinear, Ternary, WeightOnly  # noqa: E402
from slimkit.quantize.mixed import layer_bytes  # noqa: E402
from slimkit.runtime import build  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)


def size_of(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sk.save(model, Path(tmp) / "m")
        return artifact_bytes(Path(tmp) / "m")


def logits_sqnr(task: Any, run: Any) -> float:
    ref, got = [], []
    with torch.inference_mode():
        for (x,), _ in task.eval:
            ref.append(task.model(x))
            got.append(torch.as_tensor(run(x)))
    r, g = torch.cat(ref), torch.cat(got)
    noise = float((r - g).norm())
    return math.inf if noise == 0 else round(20 * math.log10(float(r.norm()) / noise), 2)


def row(task: Any, name: str, model: nn.Module, backend: str, fp32_bytes: int, seconds: float) -> dict[str, Any]:
    run = build(model, backend, task.example)
    scores = task.evaluate(run)
    out = {"contender": name, "score": round(scores["score"], 4), "backend": backend,
           "artifact_bytes": size_of(model), "seconds": round(seconds, 1)}
    out["smaller_than_fp32"] = round(fp32_bytes / out["artifact_bytes"], 2)
    if "cosine_to_fp32" in scores:
        out["cosine_to_fp32"] = round(scores["cosine_to_fp32"], 5)
    elif task.name == "mnist":
        out["logits_sqnr_db"] = logits_sqnr(task, run)
    info = getattr(model, "slimkit_quant", {})
    if "bits" in info:
        out["bits"] = info["bits"]
        out["weight_bytes"], out["budget_bytes"] = info["weight_bytes"], round(info["budget_bytes"])
    print(f"  {name:34s} score {out['score']:.4f}  {out['smaller_than_fp32']:>6}x  "
          f"{out.get('cosine_to_fp32', out.get('logits_sqnr_db', ''))}  {out['seconds']}s", flush=True)
    return out


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def uniform_ratio(model: nn.Module, four: bool) -> float:
    layers = [model.get_submodule(n) for n in weight_layers(model)]
    used = 0
    for m in layers:
        b4 = layer_bytes(m, 4, 32) if four else None
        used += b4 if b4 is not None else layer_bytes(m, 8, 32)
    return used / sum(4 * m.weight.numel() for m in layers)


def ptq_int4_per_channel(model: nn.Module) -> nn.Module:
    """Round-to-nearest int4 with one scale/zero per output row (WeightOnly only offers groups)."""
    import copy

    from slimkit.io import set_submodule

    out = copy.deepcopy(model)
    for n, m in list(out.named_modules()):
        if isinstance(m, nn.Linear):
            set_submodule(out, n, QuantLinear.from_float(m, bits=4, group_size=0))
    return out.eval()


def run_task(task: Any, steps: int, lr: float, extreme: bool, int8_static: dict[str, Any]) -> list[dict[str, Any]]:
    model = task.model
    fp32_bytes = size_of(model)
    rows = [row(task, "fp32", model, "torch", fp32_bytes, 0.0)]
    apply = lambda c: timed(lambda: sk.apply(model, c, task))  # noqa: E731
    q, s = apply(Int8(activations="static", **int8_static))
    rows.append(row(task, "PTQ int8 static", q, "onnxruntime", fp32_bytes, s))
    q, s = apply(QAT(bits=8, steps=steps, lr=lr, evaluate=False, calibration=int8_static["calibration"],
                     symmetric=int8_static["symmetric"]))
    rows.append(row(task, "QAT int8 static", q, "onnxruntime", fp32_bytes, s))
    for group in (32, 0):
        if group:
            q, s = apply(WeightOnly(bits=4, group_size=group, targets="all-linear"))
        else:
            q, s = timed(lambda: ptq_int4_per_channel(model))
        rows.append(row(task, f"PTQ int4 weight-only g{group}", q, "torch", fp32_bytes, s))
        q, s = apply(QAT(bits=4, weight_only=True, group_size=group, steps=steps, lr=lr, evaluate=False))
        rows.append(row(task, f"QAT int4 weight-only g{group}", q, "torch", fp32_bytes, s))
    r4, r8 = uniform_ratio(model, True), uniform_ratio(model, False)
    for label, cands, ratio in (("uniform int8", (8,), 1.0), ("mixed @ int8 bytes", (4, 8, 16), r8),
                                ("uniform int4 (int8 where int4 cannot)", (4, 8), r4 + 1e-9),
                                ("mixed @ midway int4..int8 bytes", (4, 8, 16), (r4 + r8) / 2)):
        q, s = apply(Mixed(candidates=cands, budget_ratio=ratio))
        rows.append(row(task, label, q, "torch", fp32_bytes, s))
    if extreme:
        for cfg in (Ternary(steps=steps), Binary(steps=steps)):
            q, s = apply(cfg)
            rows.append(row(task, f"{cfg.mode} (first/last int8)", q, "torch", fp32_bytes, s))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mnist-steps", type=int, default=300)
    ap.add_argument("--minilm-steps", type=int, default=40)
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(args.threads), "load_average_before": load_before,
                               "contended": load_before > (os.cpu_count() or 1) - args.threads + 0.5,
                               "note": "quality and size only; the 'seconds' column is wall time of the technique "
                                       "(training included) on a shared machine, not a latency measurement"}
    print("mnist", flush=True)
    mnist = sk.zoo.load("mnist")
    results["mnist"] = {"steps": args.mnist_steps, "lr": 5e-4,
                        "rows": run_task(mnist, args.mnist_steps, 5e-4, True,
                                         {"calibration": "mse", "symmetric": False})}
    if not args.skip_minilm:
        print("minilm", flush=True)
        minilm = sk.zoo.load("minilm")
        results["minilm"] = {"steps": args.minilm_steps, "lr": 2e-5,
                             "rows": run_task(minilm, args.minilm_steps, 2e-5, False,
                                              {"calibration": "percentile", "symmetric": False})}
    results["seconds_total"] = round(time.perf_counter() - start, 1)
    results["load_average_after"] = os.getloadavg()[0]
    print("wrote", write("qat_mixed", results), results["seconds_total"], "s")


if __name__ == "__main__":
    main()
