"""Factorization + distillation on CPU: parameters, quality before/after recovery, measured latency.

(a) mnist CNN: Tucker-2 / CP / SVD at >= 3x fewer parameters (ratio 0.3 per layer, ranks moved to
    multiples of 8; image-input conv and classifier kept whole). Recovery, per seed (0, 1, 2), same
    steps, lr and batches two ways: plain fine-tuning on the labels (alpha=0) and distillation from
    the original (alpha=0.9, T=4); accuracy on the task's whole test split (1,000 images).
    Latency at batch 1 and 256 on torch eager and on ONNX Runtime (each runtime compared with the
    original on that same runtime), 2 threads, interleaved medians.
(b) MiniLM: SVD of the FFN layers at 50% of their parameters, and a 3-layer student (alternate
    layers), distilled on the task's training sentences for a few step counts; plain fine-tuning of
    the same student with the same steps/lr/batches is unsupervised SimCSE (the task has no labels).
    Similarity score, cosine to fp32, latency ratio at batch 32 x 128.

Parts run separately (each short enough for the shared lock) and are merged into
bench/results/factorize_distill.json, each with its own environment and load record:

    .venv/bin/python bench/factorize_distill.py --part mnist-latency
    .venv/bin/python bench/factorize_distill.py --part mnist-batches   # ORT, Tucker variants, batch 1..1000
    .venv/bin/python bench/factorize_distill.py --part mnist-recovery --methods tucker --seeds 0,1,2
    .venv/bin/python bench/factorize_distill.py --part minilm-students --students layers_3 --steps 100,300
    .venv/bin/python bench/factorize_distill.py --part minilm-latency
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, interleaved_medians, model_latencies, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.distill import Distill, distill, minilm_student, simcse_finetune  # noqa: E402
from slimkit.factorize import CP, SVD, Tucker  # noqa: E402
from slimkit.core.record import last_record  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)
NAME = "factorize_distill"
FFN = r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"
MNIST = {"tucker": Tucker(ratio=0.3, rank_multiple=8), "cp": CP(ratio=0.3, rank_multiple=8),
         "svd": SVD(rank_ratio=0.3, targets="all", rank_multiple=8),
         # smaller conv ranks (the convs hold the time, the Linear the parameters): faster Tuckers
         "tucker_0.2": Tucker(ratio=0.2, rank_multiple=8), "tucker_16x8": Tucker(ranks=(16, 8), rank_multiple=8)}
#: The earlier ranks (no rounding), timed for comparison only.
MNIST_UNROUNDED = {"tucker_unrounded": Tucker(ratio=0.3), "cp_unrounded": CP(ratio=0.3),
                   "svd_unrounded": SVD(rank_ratio=0.3, targets="all")}
RECOVERY = {"finetuned": {"alpha": 0.0}, "distilled": {"alpha": 0.9}}
#: FitNets hints on the two factorized stages' activations (after BN + ReLU; same shapes in both models).
HINTS = {"distilled_hints": {"alpha": 0.9, "features": (("6", "6"), ("10", "10"))}}
MNIST_LR, MINILM_LR = 2e-3, 1e-4
#: The small CNN trains as fast on one thread, and one thread does not stall when others share the cores.
TRAIN_THREADS = 1


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_state() -> dict[str, Any]:
    load = os.getloadavg()[0]
    return {"loadavg_1min": round(load, 2), "cores": os.cpu_count(), "contended": load > (os.cpu_count() or 1) * 0.75}


def ratios(times: dict[str, dict[str, float]], before: dict, note: str) -> dict[str, Any]:
    """Median and min ms per model, and speedups over ``baseline`` by median (headline) and by min."""
    base = times["baseline"]
    return {"load_before": before, "load_after": load_state(), "runtime": note,
            "median_ms": {k: round(v["median_ms"], 4) for k, v in times.items()},
            "min_ms": {k: round(v["min_ms"], 4) for k, v in times.items()},
            "speedup": {k: round(base["median_ms"] / v["median_ms"], 3) for k, v in times.items() if k != "baseline"},
            "speedup_by_min": {k: round(base["min_ms"] / v["min_ms"], 3) for k, v in times.items() if k != "baseline"}}


def torch_latency(models: dict[str, nn.Module], inputs: tuple, threads: int, rounds: int) -> dict[str, Any]:
    before = load_state()
    times = model_latencies(models, inputs, baseline="baseline", threads=threads, rounds=rounds, min_time_s=0.2)
    return ratios(times, before, "torch eager (as trained: BatchNorm separate)")


def ort_latency(models: dict[str, nn.Module], inputs: tuple, threads: int, rounds: int) -> dict[str, Any]:
    from slimkit.runtime import build

    runs = {k: build(m, "onnxruntime", inputs, threads=threads) for k, m in models.items()}
    before = load_state()
    times = interleaved_medians({k: (lambda r=r: r(*inputs)) for k, r in runs.items()}, rounds=rounds, min_time_s=0.2)
    del runs  # the sessions' spinning threads must not share the cores with what runs next
    return ratios(times, before, "onnxruntime (BatchNorm folded, Conv+ReLU fused, NCHWc)")


def factorized(task: Any, configs: dict[str, Any]) -> dict[str, nn.Module]:
    return {name: sk.apply(task.model, config, task) for name, config in configs.items()}


def mnist_latency(thread_counts: list[int]) -> dict[str, Any]:
    """Latency of the original and each factorized model (weights do not change the time), per
    thread count: 2 threads is the headline; 1 thread is the check that survives a busy machine
    (a descheduled second thread stalls every parallel op of a 0.3 ms model)."""
    task = sk.zoo.load("mnist")
    models = {"baseline": task.model, **factorized(task, {**MNIST, **MNIST_UNROUNDED})}
    x = torch.cat([b[0][0] for b in task.eval])  # (1000, 1, 28, 28)
    out: dict[str, Any] = {"params": {k: params(m) for k, m in models.items()},
                           "ranks": {k: {n: v["rank"] for n, v in last_record(m).layers.items()}
                                     for k, m in models.items() if k != "baseline"}}
    for threads in thread_counts:
        suffix = "" if threads == thread_counts[0] else f"_{threads}thread"
        for batch, rounds in ((1, 11), (256, 9)):
            inputs = (x[:batch],)
            for runtime, timer in (("torch", torch_latency), ("onnxruntime", ort_latency)):
                key = f"{runtime}_batch{batch}{suffix}"
                out[key] = {**timer(models, inputs, threads, rounds), "threads": threads}
                print(key, out[key]["speedup"], flush=True)
    return out


def mnist_batch_sweep(thread_counts: list[int], batches: list[int]) -> dict[str, Any]:
    """ONNX Runtime only (the one runtime where factorization pays here), the Tucker variants against
    the original at several batch sizes: where the honest speedup is, not only at batch 1 and 256."""
    task = sk.zoo.load("mnist")
    names = ("tucker", "tucker_0.2", "tucker_16x8")
    models = {"baseline": task.model, **factorized(task, {k: MNIST[k] for k in names})}
    x = torch.cat([b[0][0] for b in task.eval])  # (1000, 1, 28, 28)
    out: dict[str, Any] = {"params": {k: params(m) for k, m in models.items()}}
    for threads in thread_counts:
        for batch in batches:
            key = f"onnxruntime_batch{batch}_{threads}thread"
            out[key] = {**ort_latency(models, (x[:batch],), threads, rounds=9), "threads": threads, "batch": batch}
            print(key, out[key]["speedup"], flush=True)
    return out


def mnist_recovery(threads: int, methods: list[str], seeds: list[int], steps: int, hints: bool) -> dict[str, Any]:
    """Per method and seed: accuracy after plain fine-tuning and after distillation (same steps/lr/seed)."""
    task = sk.zoo.load("mnist")
    torch.set_num_threads(threads)
    base = task.evaluate()["score"]
    out: dict[str, Any] = {"baseline": {"accuracy": base, "params": params(task.model), "test_images": 1000}}
    for name in methods:
        model = sk.apply(task.model, MNIST[name], task)
        row: dict[str, Any] = {"config": MNIST[name].to_dict(), "params": params(model),
                               "params_reduction": round(params(task.model) / params(model), 3),
                               "ranks": {n: v["rank"] for n, v in last_record(model).layers.items()},
                               "accuracy_factorized": task.evaluate(model)["score"], "steps": steps, "lr": MNIST_LR,
                               "train_threads": TRAIN_THREADS,
                               "seeds": {}}
        for seed in seeds:
            per: dict[str, Any] = {}
            for label, kw in {**RECOVERY, **(HINTS if hints else {})}.items():
                student = copy.deepcopy(model)
                result = distill(student, task, Distill(temperature=4.0, steps=steps, lr=MNIST_LR, seed=seed, **kw),
                                 progress=False, threads=TRAIN_THREADS)
                per[label] = task.evaluate(student)["score"]
                per[f"{label}_s"] = result.seconds
            row["seeds"][str(seed)] = per
            print(name, seed, per, flush=True)
        row.update(summarize(row["seeds"], base))
        if hints:
            row["hints"] = summarize({k: {"finetuned": v["finetuned"], "distilled": v["distilled_hints"]}
                                      for k, v in row["seeds"].items()}, base)
        out[name] = row
    return out


def summarize(seeds: dict[str, dict[str, float]], base: float) -> dict[str, Any]:
    """Mean/std (pt) of both recoveries, the drop after distillation and the paired gap."""
    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.mean(values), 5),
                "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0}

    ft = [s["finetuned"] for s in seeds.values()]
    kd = [s["distilled"] for s in seeds.values()]
    gap = [100 * (k - f) for k, f in zip(kd, ft)]
    return {"finetuned": stats(ft), "distilled": stats(kd),
            "drop_after_distill_pt": round(100 * (base - statistics.mean(kd)), 2),
            "distill_minus_finetune_pt": {**stats(gap), "per_seed": [round(g, 2) for g in gap]},
            "distill_wins": sum(g > 0 for g in gap), "ties": sum(g == 0 for g in gap)}


def minilm_students(task: Any) -> dict[str, nn.Module]:
    return {"svd_ffn_0.5": sk.apply(task.model, SVD(rank_ratio=0.5, targets=FFN, keep_output=False), task),
            "layers_3": minilm_student(task.model, 3)}


def minilm_row(task: Any, student: nn.Module, base: dict) -> dict[str, Any]:
    r = task.evaluate(student)
    return {"score": r["score"], "cosine_to_fp32": r.get("cosine_to_fp32"), "score_drop": round(base["score"] - r["score"], 4),
            "sets": {k: v for k, v in r.items() if k not in ("score", "cosine_to_fp32")}}


def minilm_part(threads: int, names: list[str], steps: list[int], simcse_steps: int) -> dict[str, Any]:
    """Per student: undistilled, distilled for each of ``steps``, and SimCSE for ``simcse_steps``."""
    task = sk.zoo.load("minilm")
    torch.set_num_threads(threads)
    base = task.evaluate()
    out: dict[str, Any] = {"baseline": {"score": base["score"], "params": params(task.model)}}
    students = minilm_students(task)
    for name in names:
        student = students[name]
        row: dict[str, Any] = {"params": params(student), "params_reduction": params(task.model) / params(student),
                               "before": minilm_row(task, student, base), "distilled": {}, "lr": MINILM_LR}
        if name.startswith("svd"):
            ffn = [m for n, m in task.model.named_modules() if re.fullmatch(FFN, n)]
            kept = sum(p.numel() for n, m in student.named_modules() if re.fullmatch(FFN, n) for p in m.parameters())
            row["ffn_params_kept"] = kept / sum(p.numel() for m in ffn for p in m.parameters())
        for n in steps:
            s = copy.deepcopy(student)
            result = distill(s, task, Distill(steps=n, lr=MINILM_LR), progress=False, threads=threads)
            row["distilled"][str(n)] = {**minilm_row(task, s, base), "seconds": result.seconds}
            print(name, "distilled", n, row["distilled"][str(n)], flush=True)
        if simcse_steps:
            s = copy.deepcopy(student)
            result = simcse_finetune(s, task, steps=simcse_steps, lr=MINILM_LR, progress=False, threads=threads)
            row["simcse"] = {**minilm_row(task, s, base), "steps": simcse_steps, "seconds": result.seconds}
            print(name, "simcse", row["simcse"], flush=True)
        out[name] = row
    return out


def minilm_latency(threads: int) -> dict[str, Any]:
    task = sk.zoo.load("minilm")
    models = {"baseline": task.model, **minilm_students(task)}
    ids, mask = task.example  # (8, 128) real paragraphs
    batch = (ids.repeat(4, 1), mask.repeat(4, 1))  # (32, 128)
    out = torch_latency(models, batch, threads, rounds=5)
    print("latency", out["speedup"], flush=True)
    return out


def merge(key: str, sub: str | None, value: dict[str, Any], threads: int, args: dict) -> Path:
    """Write ``value`` under ``payload[key][sub]`` (or ``payload[key]``), keeping every other part."""
    path = RESULTS / f"{NAME}.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    record = {**value, "environment": environment(threads), "settings": args}
    if sub is None:
        payload[key] = record
    else:
        payload.setdefault(key, {})
        if sub in payload[key] and isinstance(payload[key][sub], dict):
            payload[key][sub] = {**payload[key][sub], **{k: v for k, v in record.items()}}
        else:
            payload[key][sub] = record
    return write(NAME, payload)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", required=True,
                    choices=("mnist-latency", "mnist-batches", "mnist-recovery", "minilm-students", "minilm-latency"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="tucker,cp,svd")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--mnist-steps", type=int, default=300)
    ap.add_argument("--hints", action="store_true", help="also distill with FitNets hints (features)")
    ap.add_argument("--students", default="layers_3,svd_ffn_0.5")
    ap.add_argument("--steps", default="100,300")
    ap.add_argument("--simcse-steps", type=int, default=300)
    args = ap.parse_args()
    start = time.perf_counter()
    settings = {**vars(args), "load_at_start": load_state()}
    if args.part == "mnist-latency":
        counts = [args.threads] + [t for t in (1,) if t != args.threads]
        path = merge("mnist", "latency", mnist_latency(counts), args.threads, settings)
    elif args.part == "mnist-batches":
        counts = [args.threads] + [t for t in (1,) if t != args.threads]
        path = merge("mnist", "latency_batches", mnist_batch_sweep(counts, [1, 16, 64, 256, 1000]), args.threads,
                     settings)
    elif args.part == "mnist-recovery":
        result = mnist_recovery(args.threads, args.methods.split(","), [int(s) for s in args.seeds.split(",")],
                                args.mnist_steps, args.hints)
        path = None
        for method in args.methods.split(","):
            path = merge("mnist", f"recovery_{method}", {**result[method], "baseline": result["baseline"]},
                         args.threads, settings)
    elif args.part == "minilm-students":
        result = minilm_part(args.threads, args.students.split(","), [int(s) for s in args.steps.split(",")],
                             args.simcse_steps)
        for name in args.students.split(","):
            path = merge("minilm", name, {**result[name], "baseline": result["baseline"]}, args.threads, settings)
    else:
        path = merge("minilm", "latency_batch32x128", minilm_latency(args.threads), args.threads, settings)
    print(path, f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
