"""QAT vs PTQ, mixed vs uniform precision, binary/ternary vs int4: quality at measured artifact sizes.

mnist CNN and MiniLM, side by side in one process, in parts (``--parts``; a part not run keeps its
numbers from the previous results file, with that run's date):

- ``*_qat``: PTQ vs QAT int8 static (ONNX Runtime's integer kernels) and int4 weight-only of the
  Linear layers (grouped g32 and per channel g0, torch). mnist adds the int4 setting where PTQ
  loses accuracy: **every** weight layer (convolutions too) at int4 with one symmetric step per
  tensor; PTQ with the max-abs step and with the least-MSE step (QAT's start), QAT (LSQ) over
  several seeds, paired with PTQ image by image (McNemar's exact test on the disagreements).
- ``*_mixed``: accuracy vs bytes: mixed precision {4, 8, 16} at budgets from the uniform int4 bytes
  to the uniform int8 bytes (one sensitivity measurement shared by every budget), against the best
  uniform width that fits each budget; mnist lets convolutions take int4 too. Plot:
  ``results/qat_mixed_curve.png``.
- ``*_groups``: the int4 group size as a mixed-precision choice (``Mixed(int4_groups=...)``): at
  exactly the uniform int4-g32 weight bytes and at 1.05x / 1.1x, mixed {int4 g32, int4 g128, 8, 16}
  vs mixed {4, 8, 16} at g32 only, uniform int4 g32 and uniform int4 at the coarse group (smaller).
  MiniLM offers group 128; mnist 64 and 128 (its big Linear has K=576, which 128 does not divide).
- ``mnist_extreme``: binary / ternary (1-2 bit, packed) vs int4 at their artifact sizes.

Sizes are the bytes of the saved artifact (``slimkit.save``); quality is the task metric, plus the
output SQNR (mnist logits) or cosine to fp32 (MiniLM). Quality and size only: no latency is timed.

    .venv/bin/python bench/qat_mixed.py [--threads 1] [--parts mnist_qat,mnist_mixed,...] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, previous_parts, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.io import artifact_bytes  # noqa: E402
from slimkit.measure.sensitivity import weight_layers  # noqa: E402
from slimkit.quantize import Binary, Int8, Mixed, QAT, QuantLinear, Ternary, WeightOnly  # noqa: E402
from slimkit.quantize.mixed import layer_bytes, measure_costs  # noqa: E402
from slimkit.quantize.qat import fold_and_freeze, ptq_start  # noqa: E402
from slimkit.runtime import build  # noqa: E402
from slimkit.core.record import last_record  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)

PARTS = ("mnist_qat", "mnist_mixed", "mnist_extreme", "minilm_qat", "minilm_mixed", "mnist_groups", "minilm_groups")
#: Extra int4 group sizes the ``*_groups`` parts offer, per task.
EXTRA_GROUPS = {"mnist": (64, 128), "minilm": (128,)}
#: Budgets of the ``*_groups`` parts, as multiples of the uniform int4-g32 bytes.
GROUP_MULTIPLES = (1.0, 1.05, 1.1)
#: Budgets of the curve, as multiples of the uniform int4 bytes (then midway and at the int8 bytes).
INT4_MULTIPLES = (1.0, 1.05, 1.1, 1.25, 1.5)


def size_of(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        sk.save(model, Path(tmp) / "m")
        return artifact_bytes(Path(tmp) / "m")


def outputs(task: Any, run: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference logits, logits of ``run``) over the mnist test split."""
    ref, got = [], []
    with torch.inference_mode():
        for (x,), _ in task.eval:
            ref.append(task.model(x))
            got.append(torch.as_tensor(run(x)))
    return torch.cat(ref), torch.cat(got)


def labels(task: Any) -> torch.Tensor:
    return torch.cat([y for _, y in task.eval])


def row(task: Any, name: str, model: nn.Module, backend: str, fp32_bytes: int, seconds: float) -> dict[str, Any]:
    run = build(model, backend, task.example)
    scores = task.evaluate(run)
    out: dict[str, Any] = {"contender": name, "score": round(scores["score"], 4), "backend": backend,
                           "artifact_bytes": size_of(model), "seconds": round(seconds, 1)}
    out["smaller_than_fp32"] = round(fp32_bytes / out["artifact_bytes"], 2)
    if "cosine_to_fp32" in scores:
        out["cosine_to_fp32"] = round(scores["cosine_to_fp32"], 5)
        out["sets"] = {k: round(v, 4) for k, v in scores.items() if k not in ("score", "cosine_to_fp32")}
    elif task.name == "mnist":
        r, g = outputs(task, run)
        noise = float((r - g).norm())
        out["logits_sqnr_db"] = math.inf if noise == 0 else round(20 * math.log10(float(r.norm()) / noise), 2)
        out["_correct"] = (g.argmax(-1) == labels(task)).tolist()
    info = dataclasses.asdict(last_record(model)) if last_record(model) else {}
    if "bits" in info:
        out["bits"] = info["bits"]
        out["weight_bytes"], out["budget_bytes"] = info["weight_bytes"], round(info["budget_bytes"])
        if "group_sizes" in info:
            out["group_sizes"] = info["group_sizes"]
    print(f"  {name:44s} score {out['score']:.4f}  {out['smaller_than_fp32']:>6}x  "
          f"{out.get('cosine_to_fp32', out.get('logits_sqnr_db', ''))}  {out['seconds']}s", flush=True)
    return out


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start


def paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """McNemar's exact test of ``b`` vs ``a`` on the same test images: images only one gets right."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a["_correct"], b["_correct"]))
    only_b = sum(y and not x for x, y in zip(a["_correct"], b["_correct"]))
    p = binomtest(only_b, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_baseline_right": only_a, "only_this_right": only_b, "mcnemar_p": round(float(p), 5)}


def ptq_int4_per_channel(model: nn.Module) -> nn.Module:
    """Round-to-nearest int4 with one scale/zero per output row (WeightOnly only offers groups)."""
    from slimkit.core.editing import set_submodule

    out = copy.deepcopy(model)
    for n, m in list(out.named_modules()):
        if isinstance(m, nn.Linear):
            set_submodule(out, n, QuantLinear.from_float(m, bits=4, group_size=0))
    return out.eval()


def ptq_int4_per_tensor_maxabs(model: nn.Module, config: QAT, task: Any) -> nn.Module:
    """Per-tensor symmetric int4 with the plain max-abs step (max|w| / 7): the naive PTQ."""
    from slimkit.core.editing import set_submodule
    from slimkit.quantize.extreme_modules import int4_stored

    out = ptq_start(model, config, task)  # same folded float weights, then re-rounded with max-abs
    folded, _, _ = fold_and_freeze(copy.deepcopy(model), config, task)
    for n in weight_layers(folded):
        layer = folded.get_submodule(n)
        w = layer.weight.detach().flatten(1)  # (N, K)
        step = w.abs().max() / 7
        set_submodule(out, n, int4_stored(layer, torch.round(w / step).clamp(-8, 7), step.expand(w.shape[0])))
    return out.eval()


def qat_rows(task: Any, steps: int, lr: float, int8_static: dict[str, Any], seeds: int) -> dict[str, Any]:
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
    out: dict[str, Any] = {"steps": steps, "lr": lr, "rows": rows}
    if task.name != "mnist":
        return out
    cfg = QAT(bits=4, weight_only=True, per_tensor=True, steps=steps, lr=lr, evaluate=False)
    q, s = timed(lambda: ptq_int4_per_tensor_maxabs(model, cfg, task))
    naive = row(task, "PTQ int4 per-tensor all layers (max-abs step)", q, "torch", fp32_bytes, s)
    rows.append(naive)
    q, s = timed(lambda: ptq_start(model, cfg, task))
    ptq = row(task, "PTQ int4 per-tensor all layers (least-MSE step)", q, "torch", fp32_bytes, s)
    rows.append(ptq)
    qat_scores = []
    for seed in range(seeds):
        q, s = apply(dataclasses.replace(cfg, seed=seed))
        r = row(task, f"QAT int4 per-tensor all layers, seed {seed}", q, "torch", fp32_bytes, s)
        r["vs_ptq_least_mse"] = paired(ptq, r)
        rows.append(r)
        qat_scores.append(r["score"])
    n = len(ptq["_correct"])
    out["int4_per_tensor"] = {
        "fp32": rows[0]["score"], "ptq_max_abs": naive["score"], "ptq_least_mse": ptq["score"],
        "qat_seeds": qat_scores, "qat_mean": round(statistics.mean(qat_scores), 4),
        "qat_min": min(qat_scores), "test_images": n,
        "binomial_se_at_fp32": round(math.sqrt(rows[0]["score"] * (1 - rows[0]["score"]) / n), 4)}
    return out


def width_ratio(model: nn.Module, bits: int, group: int, int4_convs: bool) -> float:
    """Bytes of every weight layer at ``bits`` (int8 where ``bits`` cannot hold it) over their fp32 bytes."""
    layers = [model.get_submodule(n) for n in weight_layers(model)]
    sizes = [layer_bytes(m, bits, group, int4_convs) or layer_bytes(m, 8, group) for m in layers]
    return sum(sizes) / sum(4 * m.weight.numel() for m in layers)


def mixed_rows(task: Any, int4_convs: bool) -> dict[str, Any]:
    """Accuracy vs bytes: mixed {4, 8, 16} at each budget vs the best uniform width that fits it."""
    model = task.model
    fp32_bytes = size_of(model)
    base = Mixed(candidates=(4, 8, 16), int4_convs=int4_convs)
    measured, s_measure = timed(lambda: measure_costs(model, base, task))
    r4, r8 = width_ratio(model, 4, 32, int4_convs), width_ratio(model, 8, 32, int4_convs)
    rows = [row(task, "fp32", model, "torch", fp32_bytes, 0.0)]
    uniform = {}
    for bits, ratio in ((4, r4), (8, r8)):
        q, s = timed(lambda: sk.apply(model, Mixed(candidates=(bits,), budget_ratio=ratio + 1e-9,
                                                   int4_convs=int4_convs), task))
        uniform[bits] = row(task, f"uniform int{bits}", q, "torch", fp32_bytes, s)
        uniform[bits]["ratio"] = round(ratio, 5)
    rows += [uniform[4], uniform[8]]
    if task.name == "mnist" and int4_convs:  # the usual recipe: int4 Linear, int8 convs (itself a fixed mix)
        q, s = timed(lambda: sk.apply(model, Mixed(candidates=(4, 8), budget_ratio=width_ratio(
            model, 4, 32, False) + 1e-9), task))
        rows.append(row(task, "int4 Linear + int8 convs (fixed recipe)", q, "torch", fp32_bytes, s))
    curve = []
    budgets = [(f"{m}x int4 bytes", m * r4) for m in INT4_MULTIPLES if m * r4 < r8] + \
              [("midway int4..int8", (r4 + r8) / 2), ("int8 bytes", r8)]
    for label, ratio in sorted(budgets, key=lambda b: b[1]):
        q, s = timed(lambda: sk.apply(model, dataclasses.replace(base, budget_ratio=min(1.0, ratio + 1e-9),
                                                                 measured=measured), task))
        r = row(task, f"mixed @ {label}", q, "torch", fp32_bytes, s)
        best = uniform[8] if ratio >= r8 - 1e-9 else uniform[4]
        r["ratio"], r["best_uniform_that_fits"] = round(ratio, 5), best["contender"]
        versus(r, best, "uniform")
        rows.append(r)
        curve.append(r)
    return {"int4_convs": int4_convs, "measure_seconds": round(s_measure, 1), "rows": rows,
            "measured_costs": measured}


def group_rows(task: Any, int4_convs: bool, extra: tuple[int, ...]) -> dict[str, Any]:
    """Mixed with the group size as a choice vs g32-only mixed and uniform int4 at g32 / the coarse group."""
    from slimkit.quantize.mixed import option_bytes, options

    model = task.model
    fp32_bytes = size_of(model)
    grouped = Mixed(candidates=(4, 8, 16), int4_convs=int4_convs, int4_groups=extra)
    measured, s_measure = timed(lambda: measure_costs(model, grouped, task))  # "4" (g32), "4g<extra>", "8"
    plain = {k: v for k, v in measured.items() if not k.startswith("4g")}
    layers = [model.get_submodule(n) for n in weight_layers(model)]
    fp32_weights = sum(4 * m.weight.numel() for m in layers)
    r4 = width_ratio(model, 4, 32, int4_convs)
    coarse = min(sum(min(s for s in (option_bytes(m, o, grouped) for o in options(grouped)) if s is not None)
                     for m in layers) / fp32_weights, r4)
    rows = [row(task, "fp32", model, "torch", fp32_bytes, 0.0)]
    contenders = [("uniform int4 g32", Mixed(candidates=(4,), int4_convs=int4_convs, budget_ratio=r4 + 1e-9,
                                             measured=plain)),
                  (f"uniform int4 coarsest of g{'|'.join(map(str, extra))}",
                   Mixed(candidates=(4,), int4_convs=int4_convs, int4_groups=extra, budget_ratio=coarse + 1e-9,
                         measured=measured))]
    for m in GROUP_MULTIPLES:
        contenders.append((f"mixed g32 only @ {m}x int4-g32 bytes",
                           Mixed(int4_convs=int4_convs, budget_ratio=m * r4 + 1e-9, measured=plain)))
        contenders.append((f"mixed g32|{'|'.join(map(str, extra))} @ {m}x int4-g32 bytes",
                           dataclasses.replace(grouped, budget_ratio=m * r4 + 1e-9, measured=measured)))
    base = None
    for name, cfg in contenders:
        q, s = timed(lambda: sk.apply(model, cfg, task))
        r = row(task, name, q, "torch", fp32_bytes, s)
        r["ratio"] = round(cfg.budget_ratio, 5)
        base = base or r
        if r is not base:
            versus(r, base, "uniform_g32")
        rows.append(r)
    return {"int4_convs": int4_convs, "int4_groups": list(extra), "measure_seconds": round(s_measure, 1),
            "rows": rows, "measured_costs": measured}


def versus(r: dict[str, Any], other: dict[str, Any], tag: str) -> None:
    """Add ``r``'s margins over the row ``other``: score, then cosine (MiniLM) or SQNR and paired images (mnist)."""
    r[f"vs_{tag}"] = round(r["score"] - other["score"], 4)
    if "cosine_to_fp32" in r:
        r[f"cosine_vs_{tag}"] = round(r["cosine_to_fp32"] - other["cosine_to_fp32"], 5)
    else:
        r[f"sqnr_vs_{tag}_db"] = round(r["logits_sqnr_db"] - other["logits_sqnr_db"], 2)
        r[f"vs_{tag}_paired"] = paired(other, r)


def plot(results: dict[str, Any]) -> Path | None:
    """Quality vs artifact size of the mixed and uniform rows: mnist accuracy, MiniLM score and cosine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = [(p, k) for p, k in (("mnist_mixed", "score"), ("minilm_mixed", "score"),
                                  ("minilm_mixed", "cosine_to_fp32")) if p in results]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (part, key) in zip(axes[0], panels):
        rows = results[part]["rows"]
        mixed = sorted((r for r in rows if r["contender"].startswith("mixed")), key=lambda r: r["artifact_bytes"])
        ax.plot([r["artifact_bytes"] / 1e3 for r in mixed], [r[key] for r in mixed], "o-", label="mixed {4,8,16}")
        for r in rows:
            if r["contender"].startswith(("uniform", "int4 Linear")):
                ax.plot(r["artifact_bytes"] / 1e3, r[key], "s", label=r["contender"])
        extra = results.get(part.replace("_mixed", "_groups"), {}).get("rows", [])
        grouped = [r for r in extra if r["contender"].startswith("mixed g32|")]
        if grouped:
            ax.plot([r["artifact_bytes"] / 1e3 for r in grouped], [r[key] for r in grouped], "^-",
                    label=grouped[0]["contender"].split(" @")[0])
        for r in extra:
            if r["contender"].startswith("uniform int4 coarsest"):
                ax.plot(r["artifact_bytes"] / 1e3, r[key], "D", label=r["contender"])
        fp32 = rows[0][key]
        ax.axhline(fp32, color="gray", lw=0.8, ls="--", label=f"fp32 ({fp32:g})")
        ax.set_xlabel("artifact kB")
        ax.set_ylabel({"score": "accuracy" if part.startswith("mnist") else "score"}.get(key, "cosine to fp32"))
        ax.set_title(part.split("_")[0])
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "qat_mixed_curve.png"
    fig.savefig(path, dpi=100)
    return path


def extreme_rows(task: Any, steps: int) -> dict[str, Any]:
    fp32_bytes = size_of(task.model)
    rows = [row(task, "fp32", task.model, "torch", fp32_bytes, 0.0)]
    for cfg in (Ternary(steps=steps), Binary(steps=steps)):
        q, s = timed(lambda: sk.apply(task.model, cfg, task))
        rows.append(row(task, f"{cfg.mode} (first/last int8)", q, "torch", fp32_bytes, s))
    return {"steps": steps, "rows": rows}


def strip(part: dict[str, Any]) -> dict[str, Any]:
    """Drop the per-image correctness lists (used for the paired tests) from the stored rows."""
    return {**part, "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in part["rows"]]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mnist-steps", type=int, default=300)
    ap.add_argument("--minilm-steps", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the results file")
    args = ap.parse_args()
    if args.plot_only:
        print("plot", plot(json.loads((RESULTS / "qat_mixed.json").read_text())))
        return
    parts = [p for p in args.parts.split(",") if p]
    if any(p not in PARTS for p in parts):
        raise SystemExit(f"--parts takes a comma list of {', '.join(PARTS)}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    env = environment(args.threads)
    results: dict[str, Any] = {
        "environment": env, "load_average_before": load_before,
        "contended": load_before > (os.cpu_count() or 1) - args.threads + 0.5,
        "note": "quality and size only; the 'seconds' column is wall time of the technique (training included) "
                "on a shared machine, not a latency measurement"}
    results.update(previous_parts("qat_mixed", tuple(p for p in PARTS if p not in parts)))
    tasks: dict[str, Any] = {}
    for part in parts:
        name = part.split("_")[0]
        print(part, flush=True)
        task = tasks.setdefault(name, sk.zoo.load(name))
        part_start = time.perf_counter()
        if part == "mnist_qat":
            out = qat_rows(task, args.mnist_steps, 5e-4, {"calibration": "mse", "symmetric": False}, args.seeds)
        elif part == "minilm_qat":
            out = qat_rows(task, args.minilm_steps, 2e-5, {"calibration": "percentile", "symmetric": False}, 1)
        elif part == "mnist_extreme":
            out = extreme_rows(task, args.mnist_steps)
        elif part.endswith("_groups"):
            out = group_rows(task, int4_convs=name == "mnist", extra=EXTRA_GROUPS[name])
        else:
            out = mixed_rows(task, int4_convs=name == "mnist")
        results[part] = {**strip(out), "environment": env, "seconds": round(time.perf_counter() - part_start, 1)}
    results["seconds_total"] = round(time.perf_counter() - start, 1)
    results["load_average_after"] = os.getloadavg()[0]
    print("plot", plot(results))
    print("wrote", write("qat_mixed", results), results["seconds_total"], "s")


if __name__ == "__main__":
    main()
