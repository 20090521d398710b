"""Training memory of MiniLM distillation with and without activation recomputation (``recompute=True``).

The student is a copy of all-MiniLM-L6-v2 (``zoo.load("minilm")``), the teacher the original, the
loss ``distill.Distill``'s (embedding KD: the task has no labels); one batch of 32 real sentences (the
task's first two training batches, padded to the longer one's length). Two figures per setting:

- **activation memory** (``slimkit.train.recompute.activation_bytes``): bytes of the distinct tensors
  autograd keeps for the backward pass when the forward ends (``torch.autograd.graph.saved_tensors_hooks``;
  parameters and buffers left out; with recompute, the inputs the checkpoints keep). The peak with
  recompute adds the largest one block saves, since the backward recomputes one block at a time.
  torch's CPU allocator keeps no peak counter, so this counts what autograd holds rather than
  sampling the allocator.
- **peak RSS** (a second, coarser figure): a fresh process per setting samples ``/proc/self/statm``
  every 2 ms over one training step; reported as the peak minus the RSS just before the step.
  The C allocator reuses memory freed while loading, so this under-counts both settings alike.

Step time: full ``finetune`` steps (teacher forward, student forward + backward, AdamW) timed in
alternating rounds of one step each (after a warm-up round), median seconds per step; the ratio is
recompute over plain.

    .venv/bin/python bench/calib_memory.py [--threads 2] [--rounds 3]

Writes ``results/calib_memory.json`` (key ``recompute``; other keys in the file are kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, write  # noqa: E402

BATCH = 32
PAGE = os.sysconf("SC_PAGE_SIZE")


def setup() -> tuple[Any, Any, Any, tuple[torch.Tensor, torch.Tensor]]:
    """(task, student, loss, inputs): the distillation step the measurements run."""
    from slimkit import zoo
    from slimkit.distill.distiller import Distill, DistillLoss

    task = zoo.load("minilm")
    ids, mask = [], []
    for batch_ids, batch_mask in task.train:
        ids += list(batch_ids)
        mask += list(batch_mask)
        if len(ids) >= BATCH:
            break
    length = max(int(r.shape[0]) for r in ids)

    def pad(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(r, (0, length - r.shape[0])) for r in rows[:BATCH]])

    inputs = (pad(ids), pad(mask))  # (B, T) token ids, (B, T) attention mask
    student = copy.deepcopy(task.model).train()
    loss = DistillLoss(student, task.model, task, Distill())
    return task, student, loss, inputs


def train_task(task: Any, student: Any, inputs: tuple) -> Any:
    from slimkit.core.task import Task

    return Task(name="minilm-distill", model=student, example=inputs, metric=task.metric, eval=task.eval,
                train=[inputs])


def step_seconds(task: Any, student: Any, loss: Any, inputs: tuple, rounds: int, steps: int = 1) -> dict[str, Any]:
    """Median seconds per full training step of each setting, in alternating rounds."""
    from slimkit.train import finetune

    t = train_task(task, student, inputs)
    times: dict[str, list[float]] = {"plain": [], "recompute": []}
    for r in range(rounds + 1):  # round 0 warms up
        order = ("plain", "recompute") if r % 2 == 0 else ("recompute", "plain")
        for name in order:
            start = time.perf_counter()
            finetune(student, t, steps=steps, lr=3e-5, loss=loss, progress=False, recompute=name == "recompute")
            if r:
                times[name].append((time.perf_counter() - start) / steps)
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "rounds": len(v)}
            for name, v in times.items()}


def rss_worker(mode: str, threads: int) -> None:
    """In a fresh process: peak RSS over one training step of ``mode``, printed as JSON."""
    from slimkit.train import finetune

    torch.set_num_threads(threads)
    task, student, loss, inputs = setup()
    t = train_task(task, student, inputs)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    before, peak, running = rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    finetune(student, t, steps=1, lr=3e-5, loss=loss, progress=False, recompute=mode == "recompute")
    running[0] = False
    sampler.join()
    print(json.dumps({"rss_before_mb": before / 2**20, "peak_rss_mb": peak[0] / 2**20,
                      "peak_rss_growth_mb": (peak[0] - before) / 2**20,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-worker", choices=("plain", "recompute"))
    args = parser.parse_args()
    if args.rss_worker:
        return rss_worker(args.rss_worker, args.threads)

    from slimkit.train.recompute import activation_bytes, repeated_blocks

    torch.set_num_threads(args.threads)
    task, student, loss, inputs = setup()
    with loss.hooked():
        step = lambda: loss(student, inputs, None)  # noqa: E731
        plain = activation_bytes(student, step, recompute=False)
        recomputed = activation_bytes(student, step, recompute=True)
        times = step_seconds(task, student, loss, inputs, args.rounds)
    peak_plain = plain["saved"]
    peak_recompute = recomputed["saved"] + plain["largest_block"]
    rss = {}
    for mode in ("plain", "recompute"):
        done = subprocess.run([sys.executable, __file__, "--rss-worker", mode, "--threads", str(args.threads)],
                              capture_output=True, text=True, check=True)
        rss[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    mb = 2**20
    result = {
        "environment": environment(args.threads),
        "setup": {"model": "all-MiniLM-L6-v2 student distilled from itself (zoo minilm), embedding KD",
                  "batch": list(inputs[0].shape), "blocks_recomputed": repeated_blocks(student)},
        "method": {"activation_memory": "bytes of distinct tensors autograd saves for the backward "
                   "(saved_tensors_hooks; parameters and buffers excluded; with recompute: the checkpoints' "
                   "block inputs plus the largest block's saved bytes, recomputed one block at a time)",
                   "peak_rss": "fresh process per setting, /proc/self/statm sampled every 2 ms over 1 training "
                   "step, peak minus RSS before the step",
                   "step_time": f"full finetune steps (teacher fwd, student fwd+bwd, AdamW), {args.rounds} "
                   "alternating rounds of 1 step after a warm-up round, median s/step"},
        "activation_memory_mb": {"plain": peak_plain / mb, "recompute": peak_recompute / mb,
                                 "recompute_kept_at_forward_end": recomputed["saved"] / mb,
                                 "largest_block": plain["largest_block"] / mb},
        "activation_memory_ratio": peak_recompute / peak_plain,
        "peak_rss": rss,
        "peak_rss_growth_ratio": rss["recompute"]["peak_rss_growth_mb"] / max(rss["plain"]["peak_rss_growth_mb"], 1e-9),
        "step_time": times,
        "step_time_ratio": times["recompute"]["median_s"] / times["plain"]["median_s"],
        "goal": "activation_memory_ratio <= 0.6 at step_time_ratio <= 1.4",
    }
    result["goal_met"] = result["activation_memory_ratio"] <= 0.6 and result["step_time_ratio"] <= 1.4
    path = RESULTS / "calib_memory.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload["recompute"] = result
    print(json.dumps(result, indent=2))
    print(write("calib_memory", payload))


if __name__ == "__main__":
    main()
