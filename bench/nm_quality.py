"""2:4 pruning quality: magnitude vs SparseGPT, one-shot and after a short distillation (pruned weights kept at zero).

    .venv/bin/python bench/nm_quality.py            # ~10 min on 2 cores -> bench/results/nm_quality.json

mnist CNN (accuracy) and the real all-MiniLM-L6-v2 (similarity score and mean cosine to the dense
embeddings). Every target Linear/Conv whose input size is a multiple of 4 is pruned to 2 of every 4;
SparseGPT uses the task's calibration batches. Recovery is ``Distill`` from the dense model (the task's
own) with the same steps and learning rate for both methods; the 2:4 pattern is checked afterwards.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import environment, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.distill import Distill, distill  # noqa: E402
from slimkit.prune.nm import NM, is_nm  # noqa: E402
from slimkit.core.record import last_record  # noqa: E402

#: task -> (distillation steps, peak learning rate, the quality key reported beside the score)
RECOVERY = {"mnist": (100, 1e-3, None), "minilm": (200, 1e-4, "cosine_to_fp32")}


def quality(task: Any, model: nn.Module, key: str | None) -> dict[str, float]:
    result = task.evaluate(model)
    return {"score": round(result["score"], 4), **({key: round(result[key], 4)} if key else {})}


def run_task(name: str) -> dict[str, Any]:
    task = sk.zoo.load(name)
    steps, lr, key = RECOVERY[name]
    rows: dict[str, Any] = {"dense": quality(task, task.model, key), "recovery": {"distill_steps": steps, "lr": lr}}
    for method in ("magnitude", "sparsegpt"):
        t0 = time.perf_counter()
        pruned = sk.apply(copy.deepcopy(task.model), NM(n=2, m=4, method=method), task)
        prune_s = time.perf_counter() - t0
        one_shot = quality(task, pruned, key)
        distill(pruned, task, Distill(steps=steps, lr=lr, alpha=1.0), progress=False)
        layers = [m for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        kept = all(is_nm(m.weight, 2, 4) for m in layers if m.weight[0].numel() % 4 == 0)
        rows[method] = {"one_shot": one_shot, "after_distill": quality(task, pruned, key),
                        "sparsity": round(last_record(pruned).sparsity, 4), "prune_s": round(prune_s, 1),
                        "pattern_kept_after_distill": kept}
        print(f"{name} {method}: one-shot {one_shot}, after {steps} distillation steps {rows[method]['after_distill']}",
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="mnist,minilm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict[str, Any] = {"environment": environment(args.threads)}
    for name in args.tasks.split(","):
        res[name] = run_task(name)
    print(f"wrote {write('nm_quality', res)}")


if __name__ == "__main__":
    main()
