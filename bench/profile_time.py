"""How long profile() takes on the mnist model: the foundation's "< 5 s" target, timed here, not in a unit test.

Warm: median of repeated calls in one process, after torch's one-time dispatch-mode import
(torch._dynamo, seconds) has been paid. Cold: a fresh process's first call, which pays it.

    .venv/bin/python bench/profile_time.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import environment, write  # noqa: E402

TARGET_S = 5.0
COLD = ("import time, torch, slimkit as sk; torch.set_num_threads({threads}); task = sk.zoo.load('mnist'); "
        "x = task.example; start = time.perf_counter(); sk.profile(task.model, x); "
        "print(time.perf_counter() - start)")


def warm_seconds(threads: int, repeats: int) -> list[float]:
    import slimkit as sk

    torch.set_num_threads(threads)
    task = sk.zoo.load("mnist")
    sk.profile(task.model, task.example)  # pays the one-time import
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        sk.profile(task.model, task.example)
        out.append(time.perf_counter() - start)
    return out


def cold_seconds(threads: int, repeats: int) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = COLD.format(threads=threads)
    return [float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                 text=True).stdout.strip().splitlines()[-1]) for _ in range(repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    warm, cold = warm_seconds(args.threads, args.repeats), cold_seconds(args.threads, max(1, args.repeats // 2))
    payload = {
        "environment": environment(args.threads),
        "load": {"loadavg_1m": round(load, 2), "contended": load > 0.5 * (os.cpu_count() or 1)},
        "warm_s": {"median": statistics.median(warm), "all": warm},
        "cold_first_call_s": {"median": statistics.median(cold), "all": cold},
        "target": {"target": f"profile of the mnist model < {TARGET_S} s", "met": statistics.median(warm) < TARGET_S,
                   "met_cold": statistics.median(cold) < TARGET_S},
    }
    path = write("profile_time", payload)
    print(path, payload["warm_s"]["median"], payload["cold_first_call_s"]["median"])


if __name__ == "__main__":
    main()
