"""Architectural efficiency on CPU: BN folding + compilation, early exit / cascade, hardware-aware NAS.

(a) BN folding and compilation (eager, inductor, ONNX Runtime) on the mnist CNN (batch 256) and a
    ResNet-18-shaped HF model (random init, batch 8 x 3 x 224 x 224): interleaved medians, ratios.
(b) Early exits on the mnist CNN served on ONNX Runtime (one session per block + exit head),
    calibrated for the lowest measured mean cost at <= 0.3 pt on held-out training batches, against
    the full model on ONNX Runtime; eager numbers and a small/large cascade beside: test accuracy,
    exit distribution, latency ratios (interleaved medians of whole eval-set passes).
(c) NAS on mnist: supernet trained once with the original as teacher, TPE + evolution over its
    members, each timed interleaved with the baseline, under baseline / 3.3 (eval batch of 256); the
    winner fine-tuned and measured against the baseline; latency lookup-table error on unseen
    architectures (layers and models timed in interleaved rounds).
Writes bench/results/arch.json.

    .venv/bin/python bench/arch.py [--threads 2] [--skip-fuse] [--skip-exit] [--skip-nas] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved_medians, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.architecture import (Cascade, EarlyExitConfig, calibrate, compiled, evaluate_routed,  # noqa: E402
                                  fold_batchnorm, inductor_available, latency_over)
from slimkit.nas import (CNNSpace, LatencyPredictor, SuperCNN, SupernetEvaluator, best_feasible, evolve,  # noqa: E402
                         measure_archs, optuna_search, recalibrate_bn, train_supernet)
from slimkit.core.task import accuracy  # noqa: E402
from slimkit.train import finetune  # noqa: E402
from slimkit.zoo.mnist import build_model  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)


def load_state(threads: int) -> dict[str, Any]:
    """Machine load before a timing run; 'contended' when other work already fills the cores."""
    load1 = os.getloadavg()[0]
    return {"loadavg_1m": round(load1, 2), "threads": threads, "contended": load1 > (os.cpu_count() or 1) - threads + 0.5}


def runner(fn: Callable[..., Any], *inputs: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return fn(*inputs)
    return run


def resnet18() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                         layer_type="basic", num_labels=1000)
    return T.ResNetForImageClassification(cfg).eval()


def fuse_part(task: Any, threads: int, rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"inductor": dict(zip(("available", "why"), inductor_available()))}
    cases = {"mnist_cnn": (task.model, (task.eval[0][0][0],), task.example),
             "resnet18": (resnet18(), (torch.randn(8, 3, 224, 224),), (torch.randn(1, 3, 224, 224),))}
    for name, (model, batch, example) in cases.items():
        folded, names = fold_batchnorm(model, example)
        with torch.inference_mode():
            ref, got = model(*batch), folded(*batch)
        ref, got = getattr(ref, "logits", ref), getattr(got, "logits", got)
        contenders: dict[str, Callable[[], Any]] = {"eager": runner(model, *batch), "folded eager": runner(folded, *batch)}
        build_s: dict[str, float] = {}
        errors: dict[str, str] = {}
        kernels: dict[str, Any] = {}
        for backend in ("inductor", "onnxruntime"):
            for label, m in (("", model), ("folded ", folded)):
                if backend == "inductor" and label == "":
                    continue  # inductor folds BN itself at inference; the folded model is what we ship
                t0 = time.perf_counter()
                try:
                    run = compiled(m, example, backend, threads=threads)
                except sk.SlimkitError as exc:
                    errors[f"{label}{backend}"] = exc.problem
                    continue
                build_s[f"{label}{backend}"] = round(time.perf_counter() - t0, 1)
                if backend == "onnxruntime":
                    kernels[f"{label}{backend}"] = dict(run.kernels)
                contenders[f"{label}{backend}"] = runner(run, *batch)
        state = load_state(threads)
        times = interleaved_medians(contenders, rounds=rounds, min_time_s=0.3 if name == "mnist_cnn" else 0.6)
        base = times["eager"]["median_ms"]
        out[name] = {"batch": list(batch[0].shape), "folded_bns": len(names), "max_abs_diff_folded": float((ref - got).abs().max()),
                     "load": state, "build_seconds": build_s, "errors": errors, "ort_kernels": kernels,
                     "rows": {k: {"median_ms": round(v["median_ms"], 3), "speedup_vs_eager": round(base / v["median_ms"], 3)}
                              for k, v in times.items()}}
        print(name, {k: v["speedup_vs_eager"] for k, v in out[name]["rows"].items()}, flush=True)
    return out


def exit_part(task: Any, threads: int, rounds: int) -> dict[str, Any]:
    """Exits trained on the frozen backbone (self-distillation from the final head), served on ONNX
    Runtime and calibrated there for the lowest mean cost at <= 0.3 pt on held-out training batches;
    the baseline is the full model on the same runtime. Eager PyTorch numbers are reported beside."""
    from slimkit.architecture.exit_runtime import build_exits
    from slimkit.runtime import build

    base_acc = task.evaluate()["score"]
    holdout = task.train[-10:]
    x0 = task.eval[0][0][0]  # (256, 1, 28, 28)
    t0 = time.perf_counter()
    ee = sk.apply(task.model, EarlyExitConfig(steps=400, max_drop=0.005, margin=0.002, distill=0.5), task)
    ort_ee = build_exits(ee, x0, "onnxruntime", threads=threads)
    costs = ort_ee.exit_costs(x0)
    calibrate(ort_ee, holdout, max_drop=0.005, margin=0.002, costs=costs)
    ee.set_thresholds(ort_ee.thresholds.tolist())  # the saved model carries the served thresholds
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # the early-exit artifact reloads through its builder
        sk.save(ee, Path(tmp) / "ee")
        back = sk.load(Path(tmp) / "ee")
        with torch.inference_mode():
            reload_equal = bool(torch.equal(back(x0), ee(x0))) and torch.equal(back.thresholds, ee.thresholds)
    full_ort = build(task.model, "onnxruntime", (x0,), threads=threads)
    ee_report = evaluate_routed(ort_ee, task.eval, per_sample=1000, repeats=3)
    eager_report = evaluate_routed(ee, task.eval, per_sample=0, repeats=3)
    torch.manual_seed(0)
    small = build_model(width=4, hidden=32)
    t0 = time.perf_counter()
    finetune(small, dataclasses.replace(task, train=task.train[:-10]), steps=600, lr=3e-3, progress=False)
    cascade = Cascade(small.eval(), task.model)
    calibrate(cascade, holdout, max_drop=0.005, margin=0.002)
    cascade_s = time.perf_counter() - t0
    cascade_report = evaluate_routed(cascade, task.eval, per_sample=1000, repeats=3)
    base_report = latency_over(full_ort, task.eval, per_sample=1000, repeats=3)
    eager_base_report = latency_over(task.model, task.eval, per_sample=1000, repeats=3)
    xs = [b[0][0] for b in task.eval]

    def whole_eval(fn: Callable[..., Any]) -> Callable[[], Any]:
        def run() -> None:
            with torch.inference_mode():
                for x in xs:
                    fn(x)
        return run

    state = load_state(threads)
    times = interleaved_medians({"full onnxruntime": whole_eval(full_ort), "early exit onnxruntime": whole_eval(ort_ee),
                                 "full eager": whole_eval(task.model), "early exit eager": whole_eval(ee),
                                 "cascade eager": whole_eval(cascade)}, rounds=rounds, min_time_s=0.5)

    def row(report: dict[str, Any], name: str, base_name: str, base: dict[str, Any], seconds: float) -> dict[str, Any]:
        out = {"test_accuracy": report["accuracy"], "drop_pt": round(100 * (base_acc - report["accuracy"]), 2),
               "exit_fraction": [round(f, 4) for f in report["exit_fraction"]], "thresholds": report["thresholds"],
               "eval_pass_ms": round(times[name]["median_ms"], 2), "baseline_eval_pass_ms": round(times[base_name]["median_ms"], 2),
               "mean_speedup": round(times[base_name]["median_ms"] / times[name]["median_ms"], 3),
               "batch256_mean_ms": round(report["batch_mean_ms"], 3), "batch256_p95_ms": round(report["batch_p95_ms"], 3),
               "setup_seconds": round(seconds, 1)}
        if "sample_mean_ms" in report:
            out |= {"sample_mean_ms": round(report["sample_mean_ms"], 4), "sample_p95_ms": round(report["sample_p95_ms"], 4),
                    "sample_mean_speedup": round(base["sample_mean_ms"] / report["sample_mean_ms"], 3)}
        return out

    out = {"baseline_accuracy": base_acc, "load": state, "runtime": "onnxruntime (baseline: the full model on onnxruntime)",
           "exit_costs_ms_per_sample": [round(c, 5) for c in costs],
           "baseline": {"eval_pass_ms": round(times["full onnxruntime"]["median_ms"], 2),
                        "batch256_mean_ms": round(base_report["batch_mean_ms"], 3),
                        "sample_mean_ms": round(base_report["sample_mean_ms"], 4),
                        "sample_p95_ms": round(base_report["sample_p95_ms"], 4),
                        "eager_eval_pass_ms": round(times["full eager"]["median_ms"], 2)},
           "early_exit": {**row(ee_report, "early exit onnxruntime", "full onnxruntime", base_report, train_s),
                          "reload_equal": reload_equal},
           "early_exit_eager": row(eager_report, "early exit eager", "full eager", eager_base_report, 0.0),
           "cascade": row(cascade_report, "cascade eager", "full eager", eager_base_report, cascade_s)}
    out["target"] = {"target": ">= 1.5x mean speedup at <= 0.5 pt drop", "speedup": out["early_exit"]["mean_speedup"],
                     "drop_pt": out["early_exit"]["drop_pt"],
                     "met": out["early_exit"]["mean_speedup"] >= 1.5 and out["early_exit"]["drop_pt"] <= 0.5}
    print("early exit", out["early_exit"], "\neager", out["early_exit_eager"], "\ncascade", out["cascade"], flush=True)
    return out


def nas_part(task: Any, threads: int, rounds: int, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    batch = 256
    space = CNNSpace.from_model(task.model, task.example)
    train, val = task.train[:-10], task.train[-10:]  # search on held-out training batches, report on test
    calib = [b[0][0] for b in train[:8]]
    # latency lookup table: layers and whole models timed in interleaved rounds; fitted on 12
    # random architectures, error on 12 it never saw
    rng = random.Random(1)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(40)))[:24]
    t0 = time.perf_counter()
    table = LatencyPredictor(batch, threads=threads).measure(archs)
    measured = measure_archs(archs, batch, threads=threads)
    table.fit(archs[:12], measured[:12])
    table_err = table.error(archs[12:], measured[12:])
    table_s = time.perf_counter() - t0
    print("latency table", table_err, flush=True)
    torch.manual_seed(0)
    supernet = SuperCNN(space)
    t0 = time.perf_counter()
    train_supernet(supernet, dataclasses.replace(task, train=train), steps=300 if quick else 900, teacher=task.model,
                   progress=True)
    supernet_s = time.perf_counter() - t0
    # every candidate timed in interleaved rounds with the baseline; the limit keeps a 10 % margin
    # under baseline / 3, since the final comparison is a separate interleaved run
    evaluate = SupernetEvaluator(supernet, calib, val, batch=batch, threads=threads, table=table, reference=task.model)
    base_ms = evaluate.reference_ms
    limit = base_ms / 3.3
    t0 = time.perf_counter()
    seed = [evaluate(space.smallest(), "seed")]  # a feasible start for the evolution when TPE finds none
    tpe = optuna_search(space, evaluate, limit, trials=12 if quick else 30)
    evo = evolve(space, evaluate, limit, generations=2 if quick else 5, population=6, children=6, start=tpe + seed)
    search_s = time.perf_counter() - t0
    everything = seed + tpe + evo
    best = best_feasible(everything, limit)
    if best is None:
        return {"error": f"no member within {limit:.3f} ms", "evaluated": [e.to_dict() for e in everything]}
    # the winner: supernet weights, fine-tuned on the whole training split with the original as teacher
    t0 = time.perf_counter()
    found = recalibrate_bn(supernet.extract(best.arch), calib)
    finetune(found, task, steps=300 if quick else 1500, lr=1e-3,
             loss=_kd_loss(task.model), progress=True, label="fine-tuning the found model")
    found.eval()
    finetune_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        sk.save(found, Path(tmp) / "found")
        back = sk.load(Path(tmp) / "found")
        x = task.eval[0][0][0]
        with torch.inference_mode():
            reload_equal = bool(torch.equal(back(x), found(x)))
    base_acc, found_acc = task.evaluate()["score"], task.evaluate(found)["score"]
    state = load_state(threads)
    timing = found_vs_baseline(task.model, found, task.eval[0][0][0], rounds)
    speed = timing["speedup_batch256"]
    all_err = table.error([e.arch for e in everything], [e.latency_ms for e in everything])
    total_s = time.perf_counter() - start
    out = {"space": {"widths": [space.widths(s) for s in range(space.stages)], "depths": space.depths,
                     "kernels": space.kernels, "hiddens": space.hiddens},
           "latency_batch": batch, "limit_ms": limit, "baseline_measured_ms": base_ms,
           "limit_rule": "baseline / 3.3, every candidate timed interleaved with the baseline", "load": state,
           "load_after": load_state(threads),
           "predictor": {"fit_archs": 12, "held_out": table_err, "on_all_searched": all_err, "seconds": round(table_s, 1)},
           "supernet_seconds": round(supernet_s, 1), "search_seconds": round(search_s, 1),
           "finetune_seconds": round(finetune_s, 1), "total_seconds": round(total_s, 1),
           "evaluated": len(evaluate.cache),
           "best_by_search": best.to_dict(),
           "found": {"arch": best.arch.to_dict(), "params": sum(p.numel() for p in found.parameters()),
                     "test_accuracy": found_acc, "baseline_accuracy": base_acc,
                     "drop_pt": round(100 * (base_acc - found_acc), 2), **timing,
                     "reload_equal": reload_equal},
           "history": [e.to_dict() for e in everything]}
    out["targets"] = {
        "nas": {"target": ">= 3x faster at <= 1 pt drop within 15 min", "speedup": round(speed, 3),
                "judged_on": f"batch {batch} (the search's latency batch); batch 1 beside",
                "speedup_batch1": out["found"]["speedup_batch1"],
                "drop_pt": out["found"]["drop_pt"], "minutes": round(total_s / 60, 1),
                "met": speed >= 3 and out["found"]["drop_pt"] <= 1 and total_s <= 900},
        "predictor": {"target": "mean relative error <= 10%", "held_out": round(table_err["mean_rel_error"], 4),
                      "met": table_err["mean_rel_error"] <= 0.10}}
    print("nas", out["found"], out["targets"], flush=True)
    return out


def remeasure_nas(threads: int, rounds: int) -> dict[str, Any]:
    """The found architecture against the baseline again, in a fresh interleaved run (a quieter moment
    than the end of a search). Random weights: dense float latency does not depend on their values;
    accuracy stays the one measured in the run."""
    import json

    from slimkit.nas import CNNArch, build

    path = Path(__file__).parent / "results" / "arch.json"
    found = json.loads(path.read_text())["nas"]["found"]
    arch = CNNArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in found["arch"].items()})
    task = sk.zoo.load("mnist")
    model = build(arch).eval()
    state = load_state(threads)
    timing = found_vs_baseline(task.model, model, task.eval[0][0][0], rounds)
    return {"date": environment(threads)["date"], "load": state, "load_after": load_state(threads), "rounds": rounds,
            "nas_target_met_batch256": timing["speedup_batch256"] >= 3 and found["drop_pt"] <= 1, **timing}


def found_vs_baseline(baseline: nn.Module, found: nn.Module, xb: torch.Tensor, rounds: int) -> dict[str, float]:
    """Found model against the baseline at the batch ``xb`` (256) and at batch 1, interleaved rounds."""
    times = interleaved_medians({"baseline": runner(baseline, xb), "found": runner(found, xb),
                                 "baseline b1": runner(baseline, xb[:1]), "found b1": runner(found, xb[:1])},
                                rounds=rounds, min_time_s=0.3)
    return {"median_ms_batch256": round(times["found"]["median_ms"], 3),
            "baseline_median_ms_batch256": round(times["baseline"]["median_ms"], 3),
            "speedup_batch256": round(times["baseline"]["median_ms"] / times["found"]["median_ms"], 3),
            "speedup_batch1": round(times["baseline b1"]["median_ms"] / times["found b1"]["median_ms"], 3)}


def _kd_loss(teacher: nn.Module) -> Callable[..., torch.Tensor]:
    import torch.nn.functional as F

    def loss(m: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        out = m(*inputs)
        with torch.no_grad():
            soft = F.softmax(teacher(*inputs), -1)
        return 0.5 * F.cross_entropy(out, labels) + 0.5 * F.kl_div(F.log_softmax(out, -1), soft, reduction="batchmean")
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-fuse", action="store_true")
    parser.add_argument("--skip-exit", action="store_true")
    parser.add_argument("--skip-nas", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer steps and trials (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the sections of the existing arch.json that are skipped")
    parser.add_argument("--remeasure-nas", action="store_true",
                        help="time the found architecture against the baseline again and add it to arch.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.remeasure_nas:
        import json

        path = Path(__file__).parent / "results" / "arch.json"
        again = remeasure_nas(args.threads, max(args.rounds, 11))
        payload = json.loads(path.read_text())
        payload["nas"]["remeasured"] = again
        print(again, "\nwrote", write("arch", payload))
        return
    task = sk.zoo.load("mnist")
    task.model.requires_grad_(True)
    payload: dict[str, Any] = {"environment": environment(args.threads), "load_at_start": load_state(args.threads)}
    t0 = time.perf_counter()
    if not args.skip_fuse:
        payload["fuse"] = fuse_part(task, args.threads, args.rounds)
    if not args.skip_exit:
        payload["early_exit"] = exit_part(task, args.threads, args.rounds)
    if not args.skip_nas:
        payload["nas"] = nas_part(task, args.threads, args.rounds, args.quick)
    payload["total_seconds"] = round(time.perf_counter() - t0, 1)
    name = "arch" if not args.quick else "arch_quick"
    old = Path(__file__).parent / "results" / f"{name}.json"
    if args.keep and old.is_file():  # a section re-measured on a quieter machine replaces only itself
        import json

        kept = json.loads(old.read_text())
        payload = {**{k: v for k, v in kept.items() if k in ("fuse", "early_exit", "nas")}, **payload,
                   "kept_sections_from": kept["environment"]["date"]}
    print("wrote", write(name, payload))


if __name__ == "__main__":
    main()
