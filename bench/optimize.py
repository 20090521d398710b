"""The constraint-driven search against the best single technique tuned alone, same budget, one process.

(a) mnist CNN: at most 5% of the original bytes, at most 1 point of accuracy lost.
    Targets: a feasible candidate within 30 trials and 10 minutes on 2 cores, >= 20x smaller.
(b) MiniLM sentence embeddings: at most 25% of the bytes, p50 latency at most 0.6x fp32 at 2 threads,
    similarity-score drop at most 0.02. Target: feasible, and better than any single technique on
    at least one axis (bytes, latency or score).

For each task two searches run with the same trials, time budget and seed: the full search
(pipelines of techniques from every stage) and the single-technique search (``max_techniques=1``:
one technique with its knobs, plus recovery training where it changes weights). Reported: trials
and wall time to the first feasible candidate, the best's bytes / latency / metric and their
ratios to the original. Latency is re-timed for both bests interleaved at the end, so the
comparison does not depend on when each was measured during the search.

    .venv/bin/python bench/optimize.py [--part mnist|minilm|all] [--trials 30] [--time-budget 600]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, model_latencies, previous_parts, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.runtime import build  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)

PARTS = {
    "mnist": {"size_share": 0.05, "latency_share": None, "max_drop": 0.01},
    "minilm": {"size_share": 0.25, "latency_share": 0.6, "max_drop": 0.02},
}


def target_for(task: Any, part: str, threads: int) -> tuple[sk.Target, dict[str, float]]:
    """The part's target from the original's measured bytes and p50 latency on ``threads`` threads."""
    spec = PARTS[part]
    p = sk.profile(task.model, task.example, threads=threads)
    base = {"size_mb": p.artifact_bytes / 1e6, "latency_ms": p.latency.p50_ms}
    latency = None if spec["latency_share"] is None else base["latency_ms"] * spec["latency_share"]
    return sk.Target(max_size_mb=base["size_mb"] * spec["size_share"], max_latency_ms=latency,
                     max_drop=spec["max_drop"], threads=threads), base


def search(task: Any, target: sk.Target, *, single: bool, trials: int, budget: float, seed: int,
           out: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    result = sk.optimize(task, target, trials=trials, time_budget=budget, seed=seed, out=out, progress=True,
                         max_techniques=1 if single else None, report=not single)
    wall = time.monotonic() - t0
    best = result.best
    row: dict[str, Any] = {"trials_run": len(result.trials), "wall_s": round(wall, 1),
                           "first_feasible": result.first_feasible, "feasible": best is not None,
                           "feasible_trials": sum(r.feasible for r in result.trials),
                           "pareto_size": len(result.pareto)}
    if best is not None:
        m = best.measured
        row.update({"pipeline": best.label(), "recipe": best.recipe, "size_mb": m.size_mb,
                    "latency_ms_in_search": m.latency_ms, "score": m.score, "drop": m.drop,
                    "backend": m.backend})
    else:
        row["hints"] = result.hints
    row["_model"] = result.best_model
    return row


def retime(task: Any, rows: dict[str, dict[str, Any]], threads: int) -> None:
    """p50 latency of the original and each best on its runtime, interleaved rounds, medians."""
    runnables = {"original": build(task.model, "torch", task.example, threads=threads)}
    for name, row in rows.items():
        if row.get("_model") is not None:
            runnables[name] = build(row["_model"], row["backend"], task.example, threads=threads)
    times = model_latencies(runnables, tuple(task.example), baseline="original", threads=threads, rounds=9)
    for name, row in rows.items():
        if name in times:
            row["latency_ms"] = round(times[name]["median_ms"], 4)
            row["speedup"] = round(times[name]["speedup"], 3)
    rows["original"] = {"latency_ms": round(times["original"]["median_ms"], 4)}


def run_part(part: str, trials: int, budget: float, threads: int, seed: int) -> dict[str, Any]:
    task = sk.zoo.load(part)
    target, base = target_for(task, part, threads)
    base_score = task.evaluate()["score"]
    print(f"\n[{part}] original {base['size_mb']:.4g} MB, {base['latency_ms']:.3g} ms, metric {base_score:.4f}; "
          f"target {target.to_dict()}")
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, single in (("search", False), ("single_technique", True)):
            rows[name] = search(task, target, single=single, trials=trials, budget=budget, seed=seed,
                                out=Path(tmp) / name)
        retime(task, rows, threads)
    original = rows.pop("original")
    for row in rows.values():
        row.pop("_model", None)
        if row["feasible"]:
            row["size_ratio"] = round(base["size_mb"] / row["size_mb"], 2)
            row["latency_share"] = round(row["latency_ms"] / original["latency_ms"], 3)
    full, alone = rows["search"], rows["single_technique"]
    summary: dict[str, Any] = {"target": target.to_dict(), "original": {**base, "score": base_score,
                                                                       "latency_ms_retimed": original["latency_ms"]},
                               **rows}
    if part == "mnist":
        ff = full.get("first_feasible") or {}
        summary["targets"] = {
            "feasible_within_30_trials_10_min": bool(full["feasible"] and ff.get("trials", 1e9) <= 30
                                                     and ff.get("seconds", 1e9) <= 600),
            "at_least_20x_smaller": bool(full["feasible"] and full["size_ratio"] >= 20)}
    else:
        better = []
        if full["feasible"] and alone["feasible"]:
            better = [axis for axis, lower in (("size_mb", True), ("latency_ms", True), ("score", False))
                      if (full[axis] < alone[axis] if lower else full[axis] > alone[axis])]
        elif full["feasible"]:
            better = ["feasibility"]
        summary["targets"] = {"feasible": bool(full["feasible"]), "better_than_single_on": better,
                              "better_on_one_axis": bool(better)}
    print(f"[{part}] targets {summary['targets']}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["mnist", "minilm", "all"], default="all")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds per search")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    parts = ["mnist", "minilm"] if args.part == "all" else [args.part]
    payload: dict[str, Any] = {"environment": environment(args.threads), "trials": args.trials,
                               "time_budget_s": args.time_budget, "seed": args.seed,
                               "load_before": round(load_before, 2),
                               "contended": load_before > (os.cpu_count() or 2) - args.threads + 0.5}
    if args.part != "all":
        payload.update(previous_parts("optimize", tuple(PARTS)))
    for part in parts:
        payload[part] = run_part(part, args.trials, args.time_budget, args.threads, args.seed)
    print(write("optimize", payload))


if __name__ == "__main__":
    main()
