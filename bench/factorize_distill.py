"""Factorization + distillation on CPU: parameters, quality before/after recovery, measured latency.

(a) mnist CNN: Tucker-2 / CP / SVD at ~1/3 of the parameters (image-input conv and classifier kept
    whole), then recovery with the same seed and step budget two ways: plain fine-tuning on the
    labels (alpha=0) and distillation from the original (alpha=0.9, T=4). Latency ratios at batch 1
    and 256 (2 threads, interleaved medians).
(b) MiniLM: SVD of the FFN layers at 50% of their parameters, and a 3-layer student (alternate
    layers), each distilled on the task's training sentences (embedding cosine loss; the task has
    no labels, so "plain fine-tuning" does not exist for it: the control is the undistilled model).
    Similarity score, cosine to fp32, latency ratio at batch 32 x 128.
Writes bench/results/factorize_distill.json.

    .venv/bin/python bench/factorize_distill.py [--threads 2] [--mnist-steps 300] [--minilm-steps 200]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, model_latencies, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.distill import Distill, distill, minilm_student  # noqa: E402
from slimkit.factorize import CP, SVD, Tucker  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)
FFN = r"bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense"


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_state() -> dict[str, Any]:
    load = os.getloadavg()[0]
    return {"loadavg_1min": round(load, 2), "cores": os.cpu_count(), "contended": load > (os.cpu_count() or 1) * 0.75}


def latency(models: dict[str, nn.Module], inputs: tuple, threads: int, rounds: int) -> dict[str, Any]:
    before = load_state()
    times = model_latencies(models, inputs, baseline="baseline", threads=threads, rounds=rounds, min_time_s=0.2)
    return {"load_before": before, "load_after": load_state(),
            "median_ms": {k: round(v["median_ms"], 4) for k, v in times.items()},
            "speedup": {k: round(v["speedup"], 3) for k, v in times.items() if k != "baseline"}}


def mnist_part(threads: int, steps: int) -> dict[str, Any]:
    task = sk.zoo.load("mnist")
    torch.set_num_threads(threads)
    base_score = task.evaluate()["score"]
    out: dict[str, Any] = {"baseline": {"accuracy": base_score, "params": params(task.model)}, "methods": {}}
    configs = {"tucker": Tucker(ratio=0.3), "cp": CP(ratio=0.3), "svd": SVD(rank_ratio=0.3, targets="all")}
    finals = {"baseline": task.model}
    for name, config in configs.items():
        start = time.perf_counter()
        factorized = sk.apply(task.model, config, task)
        row: dict[str, Any] = {"config": config.to_dict(), "params": params(factorized),
                               "params_reduction": params(task.model) / params(factorized),
                               "skipped": factorized.slimkit_factorize["skipped"],
                               "accuracy_factorized": task.evaluate(factorized)["score"],
                               "decompose_s": round(time.perf_counter() - start, 2)}
        for label, alpha in (("finetuned", 0.0), ("distilled", 0.9)):
            student = copy.deepcopy(factorized)
            result = distill(student, task, Distill(alpha=alpha, temperature=4.0, steps=steps, lr=2e-3), progress=False,
                             threads=threads)
            row[f"accuracy_{label}"] = task.evaluate(student)["score"]
            row[f"{label}_s"] = result.seconds
            if label == "distilled":
                finals[name] = student
        row["drop_after_distill_pt"] = round(100 * (base_score - row["accuracy_distilled"]), 2)
        row["distill_minus_finetune_pt"] = round(100 * (row["accuracy_distilled"] - row["accuracy_finetuned"]), 2)
        out["methods"][name] = row
        print(name, {k: v for k, v in row.items() if k not in ("config", "skipped")}, flush=True)
    x = torch.cat([b[0][0] for b in task.eval])  # (1000, 1, 28, 28)
    out["latency_batch1"] = latency(finals, (x[:1],), threads, rounds=9)
    out["latency_batch256"] = latency(finals, (x[:256],), threads, rounds=7)
    print("latency", out["latency_batch1"]["speedup"], out["latency_batch256"]["speedup"], flush=True)
    return out


def minilm_part(threads: int, steps: int) -> dict[str, Any]:
    task = sk.zoo.load("minilm")
    torch.set_num_threads(threads)
    base = task.evaluate()
    out: dict[str, Any] = {"baseline": {"score": base["score"], "params": params(task.model)}, "students": {}}
    ffn = [m for n, m in task.model.named_modules() if re.fullmatch(FFN, n)]
    students = {"svd_ffn_0.5": sk.apply(task.model, SVD(rank_ratio=0.5, targets=FFN, keep_output=False), task),
                "layers_3": minilm_student(task.model, 3)}
    finals = {"baseline": task.model}
    for name, student in students.items():
        before = task.evaluate(student)
        result = distill(student, task, Distill(steps=steps, lr=1e-4), progress=False, threads=threads)
        after = task.evaluate(student)
        row = {"params": params(student), "params_reduction": params(task.model) / params(student),
               "score_before": before["score"], "cosine_before": before.get("cosine_to_fp32"),
               "score_distilled": after["score"], "cosine_distilled": after.get("cosine_to_fp32"),
               "score_drop_distilled": round(base["score"] - after["score"], 4), "distill_s": result.seconds,
               "sets_distilled": {k: v for k, v in after.items() if k not in ("score", "cosine_to_fp32")}}
        if name.startswith("svd"):
            kept = sum(p.numel() for n, m in student.named_modules() if re.fullmatch(FFN, n)
                       for p in m.parameters())
            row["ffn_params_kept"] = kept / sum(p.numel() for m in ffn for p in m.parameters())
        out["students"][name] = row
        finals[name] = student
        print(name, row, flush=True)
    ids, mask = task.example  # (8, 128) real paragraphs
    batch = (ids.repeat(4, 1), mask.repeat(4, 1))  # (32, 128)
    out["latency_batch32x128"] = latency(finals, batch, threads, rounds=5)
    print("latency", out["latency_batch32x128"]["speedup"], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mnist-steps", type=int, default=300)
    ap.add_argument("--minilm-steps", type=int, default=200)
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    start = time.perf_counter()
    payload: dict[str, Any] = {"environment": environment(args.threads), "load_at_start": load_state(),
                               "settings": vars(args)}
    if not args.skip_mnist:
        payload["mnist"] = mnist_part(args.threads, args.mnist_steps)
        write("factorize_distill", payload)  # a long MiniLM part must not lose the mnist results
    if not args.skip_minilm:
        payload["minilm"] = minilm_part(args.threads, args.minilm_steps)
    payload["total_s"] = round(time.perf_counter() - start, 1)
    print(write("factorize_distill", payload))


if __name__ == "__main__":
    main()
