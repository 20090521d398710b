"""CPU structured pruning: slimkit vs Torch-Pruning at equal MACs, and vs unstructured magnitude.

(a) ResNet-18-shaped HF model (random init), batch 8 x 3 x 224 x 224: prune to 0.5 MACs with
    slimkit (uniform ratios, MACs-aware and latency-aware allocation) and with Torch-Pruning (same
    magnitude importance), measure wall-clock speedups (interleaved medians) and speedup / MACs
    reduction. The targets are judged on the latency-aware allocation (widths chosen from
    per-layer times measured on this machine at batch 8), fixed before the run.
(b) mnist CNN: accuracy after pruning + the same fine-tuning (recipe and steps) at 0.5 and 0.25
    MACs, over several fine-tuning seeds, on the task's whole 1,000-image test split: slimkit
    (L2 importance, uniform widths, least-squares reconstruction) vs Torch-Pruning (uniform and
    global) with the same L2 group importance (slimkit's uniform widths are bit-identical to
    Torch-Pruning's before reconstruction, checked), slimkit's MACs-aware allocation, and
    unstructured magnitude at slimkit's parameter count.
(c) --select: how slimkit's configuration for (b) was chosen, without the test split: the CNN
    retrained without 480 held-out training images, every candidate pruned from it, fine-tuned on
    the other training images and scored on those 480.
Writes bench/results/prune_cpu.json.

    .venv/bin/python bench/prune_cpu.py [--threads 2] [--steps 300] [--seeds 12] [--select] [--skip-mnist] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import statistics
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, model_latencies, previous_parts, write  # noqa: E402

import slimkit as sk  # noqa: E402
from slimkit.runtime import build  # noqa: E402
from slimkit.runtime.layout import ChannelsLast  # noqa: E402
from slimkit.graph.dependency import output_layer, tp_inputs  # noqa: E402
from slimkit.measure.flops import count_flops  # noqa: E402
from slimkit.prune import Channels, Magnitude, masked  # noqa: E402
from slimkit.train import finetune  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("slimkit").setLevel(logging.ERROR)


def resnet18() -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                         layer_type="basic", num_labels=1000)
    return T.ResNetForImageClassification(cfg).eval()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tp_prune(model: nn.Module, example: tuple, ratio: float, round_to: int | None) -> nn.Module:
    """Torch-Pruning's documented one-shot recipe: MetaPruner + magnitude (L2) importance."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ignored = [model.get_submodule(output_layer(model, example))]
    pruner = tp.pruner.MetaPruner(model, tp_inputs(example), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to)
    pruner.step()
    return model.eval()


def tp_to_macs(model: nn.Module, example: tuple, macs_ratio: float, round_to: int | None) -> nn.Module:
    """Bisect Torch-Pruning's ratio to the largest model with MACs <= macs_ratio (as slimkit does)."""
    base = count_flops(model, example).macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(9):
        mid = (lo + hi) / 2
        pruned = tp_prune(model, example, mid, round_to)
        if count_flops(pruned, example).macs <= macs_ratio * base:
            best, hi = pruned, mid
        else:
            lo = mid
    return best if best is not None else tp_prune(model, example, hi, round_to)


SPEED = "slimkit latency"  # Channels(allocation="latency", latency_batch=8), round_to 8: judged on the targets


def resnet_part(threads: int, rounds: int) -> dict[str, Any]:
    model = resnet18()
    example = (torch.randn(1, 3, 224, 224),)
    batch = torch.randn(8, 3, 224, 224)
    task = types.SimpleNamespace(example=example)
    base_macs = count_flops(model, example).macs
    contenders: dict[str, nn.Module] = {"fp32": model}
    for r in (None, 8, 32):
        contenders[f"slimkit round_to={r}"] = sk.apply(model, Channels(macs_ratio=0.5, round_to=r), task)
    contenders["slimkit macs"] = sk.apply(model, Channels(macs_ratio=0.5, allocation="macs"), task)
    # the configuration for speed: widths chosen on this machine's measured per-layer times at the batch timed here
    contenders[SPEED] = sk.apply(model, Channels(macs_ratio=0.5, allocation="latency", latency_batch=8), task)
    contenders["slimkit latency round_to=16"] = sk.apply(
        model, Channels(macs_ratio=0.5, allocation="latency", latency_batch=8, round_to=16), task)
    contenders["torch-pruning"] = tp_to_macs(model, example, 0.5, None)
    contenders["torch-pruning round_to=8"] = tp_to_macs(model, example, 0.5, 8)
    # the deployed form: slimkit's torch runtime keeps the faster layout (NCHW or channels-last), and
    # so gets the original, so the pruned model is compared with the original at its best too
    contenders["fp32 (runtime layout)"] = build(model, "torch", (batch,), threads=threads)
    contenders[f"{SPEED} (runtime layout)"] = build(contenders[SPEED], "torch", (batch,), threads=threads)
    times = model_latencies(contenders, (batch,), baseline="fp32", threads=threads, rounds=rounds, min_time_s=0.5)
    rows = {}
    for name, m in contenders.items():
        m = m.model if isinstance(m, ChannelsLast) else m
        macs = count_flops(m, example).macs / base_macs
        speedup = times[name]["speedup"]
        rows[name] = {"macs_ratio": round(macs, 4), "params": params(m), "median_ms": round(times[name]["median_ms"], 2),
                      "min_ms": round(times[name]["min_ms"], 2), "max_ms": round(times[name]["max_ms"], 2),
                      "speedup": round(speedup, 3), "speedup_per_macs_reduction": round(speedup * macs, 3),
                      "conv_widths": [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]}
    best_tp = max(rows[k]["speedup"] for k in rows if k.startswith("torch-pruning"))
    return {"model": "HF ResNetConfig, ResNet-18 depths, random init", "batch": list(batch.shape),
            "rows": rows, "targets": {
                "slimkit_speedup_at_0.5_macs": {"target": ">= 2.0", "config": SPEED, "measured": rows[SPEED]["speedup"]},
                "vs_best_torch_pruning": {"target": ">= 1.0", "measured": round(rows[SPEED]["speedup"] / best_tp, 3)},
                "deployed_speedup_at_0.5_macs": {
                    "target": ">= 2.0", "layout": type(contenders[f"{SPEED} (runtime layout)"]).__name__,
                    "vs_original_as_given": rows[f"{SPEED} (runtime layout)"]["speedup"],
                    "vs_original_in_its_runtime_layout": round(
                        times["fp32 (runtime layout)"]["median_ms"] / times[f"{SPEED} (runtime layout)"]["median_ms"], 3)}}}


def tp_global_to_macs(model: nn.Module, example: tuple, macs_ratio: float) -> nn.Module:
    """Torch-Pruning's own cross-layer allocation: global ranking of the (mean-normalised) L2 scores."""
    import torch_pruning as tp

    base = count_flops(model, example).macs
    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        pruned = copy.deepcopy(model)
        ignored = [pruned.get_submodule(output_layer(pruned, example))]
        tp.pruner.MetaPruner(pruned, tp_inputs(example), importance=tp.importance.GroupMagnitudeImportance(p=2),
                             pruning_ratio=mid, global_pruning=True, ignored_layers=ignored).step()
        if count_flops(pruned, example).macs <= macs_ratio * base:
            best, hi = pruned.eval(), mid
        else:
            lo = mid
    return best


def test_nll(model: nn.Module, task: Any) -> float:
    """Mean cross-entropy on the test split: a finer signal than accuracy, where one image is 0.1 pt."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for (x,), y in task.eval:  # x: (B, 1, 28, 28)
            total += float(F.cross_entropy(model(x), y, reduction="sum"))
            n += y.numel()
    return total / n


def spread(values: list[float], digits: int = 4) -> dict[str, Any]:
    return {"mean": round(statistics.mean(values), digits),
            "std": round(statistics.stdev(values), digits) if len(values) > 1 else 0.0,
            "per_seed": [round(v, digits) for v in values]}


# slimkit's configuration in (b) is the candidate with the best mean validation accuracy over both
# ratios in (c); this one stands in only when (c) was never run
DEFAULT_CHOICE = "uniform + reconstruct"
CANDIDATES = {"uniform": {}, "global": {"scope": "global"}, "macs": {"allocation": "macs"},
              "uniform + reconstruct": {"reconstruct": True},
              "global + reconstruct": {"scope": "global", "reconstruct": True},
              "macs + reconstruct": {"allocation": "macs", "reconstruct": True}}


def selection_part(threads: int, steps: int, seeds: int) -> dict[str, Any]:
    """Choose slimkit's (b) configuration on a validation split: the last 480 training images are
    held out, the CNN is retrained without them (the task's recipe), and every candidate is pruned
    from that model, fine-tuned on the rest and scored on them."""
    from slimkit.core.task import accuracy
    from slimkit.zoo import mnist
    from slimkit.zoo._vision import trained_model

    torch.set_num_threads(threads)
    task = sk.zoo.load("mnist")
    train = list(task.train)
    val = train[-8:]
    x_dev = torch.cat([x for (x,), _ in train[:-8]])  # (3520, 1, 28, 28)
    y_dev = torch.cat([y for _, y in train[:-8]])
    model, _ = trained_model("mnist", mnist.build_model, x_dev, y_dev, mnist.TRAIN, progress=False)
    dev = dataclasses.replace(task, model=model.eval(), train=train[:-8], eval=val)
    task = dev
    base_macs = count_flops(task.model, task.example).macs
    rows: dict[str, Any] = {}
    for ratio in (0.5, 0.25):
        budget = count_flops(tp_to_macs(task.model, task.example, ratio, None), task.example).macs / base_macs
        for name, options in CANDIDATES.items():
            pruned = sk.apply(task.model, Channels(macs_ratio=budget, round_to=None, **options), dev)
            accs = []
            for seed in range(seeds):
                m = copy.deepcopy(pruned)
                finetune(m, dev, steps=steps, progress=False, seed=seed)
                accs.append(accuracy(m, val))
            rows.setdefault(name, {})[str(ratio)] = spread(accs)
            print(f"select {name} @ {ratio}: {statistics.mean(accs):.4f}", flush=True)
    mean = {name: round(statistics.mean(r[k]["mean"] for k in r), 4) for name, r in rows.items()}
    chosen = max(mean, key=mean.get)
    return {"validation_images": sum(int(y.numel()) for _, y in val), "fine_tune_images": int(y_dev.numel()),
            "unpruned_validation_accuracy": accuracy(dev.model, val),
            "seeds": seeds, "rows": rows, "mean_over_ratios": mean, "chosen": chosen,
            "note": "(b) prunes with this candidate's options"}


SHORT_BUDGETS = (0, 25, 100)


def short_budgets(models: dict[str, nn.Module], task: Any, seeds: int) -> dict[str, dict[str, float]]:
    """Mean test accuracy after 0, 25 and 100 fine-tuning steps: where a better start still shows."""
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        for steps in SHORT_BUDGETS:
            accs = []
            for seed in range(seeds if steps else 1):
                m = copy.deepcopy(model)
                if steps:
                    finetune(m, task, steps=steps, progress=False, seed=seed)
                accs.append(task.evaluate(m)["score"])
            out.setdefault(name, {})[str(steps)] = round(statistics.mean(accs), 4)
    return out


def mnist_part(threads: int, steps: int, seeds: int, choice: str) -> dict[str, Any]:
    """Every contender fine-tuned with the same recipe and budget once per seed (the seed drives the
    data order; pruning is deterministic), scored on the task's whole test split."""
    torch.set_num_threads(threads)
    mine = f"slimkit l2, {choice}"
    task = sk.zoo.load("mnist")
    base = task.evaluate()["score"]
    base_params = params(task.model)
    base_macs = count_flops(task.model, task.example).macs
    result: dict[str, Any] = {
        "baseline_accuracy": base, "baseline_test_nll": round(test_nll(task.model, task), 4),
        "test_images": task.splits["test"], "finetune": {"steps": steps, "recipe": "slimkit.train.finetune defaults "
                                                          "(AdamW lr 1e-3, 5% warmup, cosine), same for every row"},
        "seeds": list(range(seeds)), "slimkit_row": mine, "slimkit_options": CANDIDATES[choice], "rows": {}}
    ft_seconds = 0.0

    def scored(model: nn.Module, *, keep_zeros: bool = False) -> dict[str, Any]:
        nonlocal ft_seconds
        accs, nlls = [], []
        for seed in range(seeds):
            m = copy.deepcopy(model)
            if keep_zeros:
                with masked(m) as after_step:
                    ft_seconds += finetune(m, task, steps=steps, after_step=after_step, progress=False, seed=seed).seconds
            else:
                ft_seconds += finetune(m, task, steps=steps, progress=False, seed=seed).seconds
            accs.append(task.evaluate(m)["score"])
            nlls.append(test_nll(m, task))
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        return {"macs_ratio": round(count_flops(model, task.example).macs / base_macs, 4),
                "nonzero_params_ratio": round(nonzero / base_params, 4),
                "widths": [p.shape[0] for p in model.parameters() if p.dim() > 1],
                "accuracy_after_pruning": task.evaluate(model)["score"],
                "accuracy": spread(accs), "test_nll": spread(nlls),
                "drop_pt": round(100 * (base - statistics.mean(accs)), 2)}

    targets: dict[str, Any] = {}
    for ratio in (0.5, 0.25):
        # one budget for all: what Torch-Pruning's uniform ratio reaches at `ratio` (channel counts are
        # integers); slimkit must stay at or under it, Torch-Pruning global may exceed it by 1%
        uniform_tp = tp_to_macs(task.model, task.example, ratio, None)
        budget = count_flops(uniform_tp, task.example).macs / base_macs
        uniform_sk = sk.apply(task.model, Channels(macs_ratio=ratio, round_to=None), task)
        same = all(torch.equal(a, b) for a, b in zip(uniform_sk.state_dict().values(), uniform_tp.state_dict().values()))
        ours = sk.apply(task.model, Channels(macs_ratio=budget, round_to=None, **CANDIDATES[choice]), task)
        macs_sk = sk.apply(task.model, Channels(macs_ratio=budget, round_to=None, allocation="macs"), task)
        # what the speed configuration costs in accuracy: widths from times measured at batch 256
        latency_sk = sk.apply(task.model, Channels(macs_ratio=budget, round_to=None, allocation="latency",
                                                   latency_batch=256, reconstruct=True), task)
        global_tp = tp_global_to_macs(task.model, task.example, 1.01 * budget)
        unstructured = sk.apply(task.model, Magnitude(amount=1 - params(ours) / base_params), task)
        rows = {
            mine: scored(ours),
            "slimkit l2, allocation=macs": scored(macs_sk),
            "slimkit l2, allocation=latency + reconstruct": scored(latency_sk),
            "torch-pruning l2, uniform (= slimkit l2, uniform)": scored(uniform_tp),
            "torch-pruning l2, global": scored(global_tp),
            "unstructured magnitude (slimkit's params)": scored(unstructured, keep_zeros=True),
        }
        rows["torch-pruning l2, uniform (= slimkit l2, uniform)"]["slimkit_uniform_weights_identical"] = same
        result.setdefault("short_budgets", {})[str(ratio)] = short_budgets(
            {mine: ours, "torch-pruning l2, uniform": uniform_tp, "torch-pruning l2, global": global_tp},
            task, min(seeds, 4))
        for name, row in rows.items():
            result["rows"][f"{name} @ {ratio} MACs"] = row
            print(f"{name} @ {ratio}: macs {row['macs_ratio']} acc {row['accuracy']['mean']} "
                  f"+- {row['accuracy']['std']} nll {row['test_nll']['mean']}", flush=True)
        ours_row = rows[mine]
        tp_rows = {k: v for k, v in rows.items() if k.startswith("torch-pruning")}
        best_tp = max(tp_rows, key=lambda k: tp_rows[k]["accuracy"]["mean"])
        diffs = [100 * (a - b) for a, b in zip(ours_row["accuracy"]["per_seed"], tp_rows[best_tp]["accuracy"]["per_seed"])]
        targets[f"slimkit_vs_best_tp_{ratio}_pt"] = {
            "target": ">= 0", "best_torch_pruning": best_tp, "measured": round(statistics.mean(diffs), 2),
            "per_seed_pt": [round(d, 1) for d in diffs],
            "std_pt": round(statistics.stdev(diffs), 2) if len(diffs) > 1 else 0.0,
            "standard_error_pt": round(statistics.stdev(diffs) / len(diffs) ** 0.5, 3) if len(diffs) > 1 else 0.0,
            "macs_ratio": [ours_row["macs_ratio"], tp_rows[best_tp]["macs_ratio"]]}
    r = result["rows"]
    result["targets"] = {
        "slimkit_0.5_within_1pt": {"target": "<= 1.0 pt", "measured": r[f"{mine} @ 0.5 MACs"]["drop_pt"]},
        **targets}
    result["finetune_seconds_total"] = round(ft_seconds, 1)
    return result


def plot_budgets(mnist: dict[str, Any]) -> Path | None:
    """Test accuracy against fine-tuning steps, one panel per MACs ratio: reconstruction's head start."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    full = mnist["finetune"]["steps"]
    names = {mnist["slimkit_row"]: mnist["slimkit_row"], "torch-pruning l2, uniform":
             "torch-pruning l2, uniform (= slimkit l2, uniform)", "torch-pruning l2, global": "torch-pruning l2, global"}
    fig, axes = plt.subplots(1, len(mnist["short_budgets"]), figsize=(10, 4), squeeze=False)
    for ax, (ratio, curves) in zip(axes[0], mnist["short_budgets"].items()):
        for name, points in curves.items():
            steps = [int(k) for k in points] + [full]
            accs = list(points.values()) + [mnist["rows"][f"{names[name]} @ {ratio} MACs"]["accuracy"]["mean"]]
            ax.plot(steps, accs, "o-", label=name)
        ax.axhline(mnist["baseline_accuracy"], color="gray", lw=0.8, ls="--", label="unpruned")
        ax.set_xscale("symlog", linthresh=25)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"mnist CNN at {ratio} MACs")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = RESULTS / "prune_cpu_budgets.png"
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--select", action="store_true", help="also run (c), the validation-split choice")
    ap.add_argument("--select-seeds", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    import torch_pruning

    payload: dict[str, Any] = {"environment": {**environment(args.threads), "torch_pruning": torch_pruning.__version__}}
    payload.update(previous_parts("prune_cpu", ("resnet18", "mnist", "selection")))
    if args.select:
        payload["selection"] = {**selection_part(args.threads, args.steps, args.select_seeds),
                                "environment": payload["environment"]}
        print(payload["selection"]["mean_over_ratios"], payload["selection"]["chosen"])
    if not args.skip_resnet:
        payload["resnet18"] = resnet_part(args.threads, args.rounds)
        print({k: (v["macs_ratio"], v["speedup"]) for k, v in payload["resnet18"]["rows"].items()})
    if not args.skip_mnist:
        choice = payload.get("selection", {}).get("chosen", DEFAULT_CHOICE)
        payload["mnist"] = {**mnist_part(args.threads, args.steps, args.seeds, choice), "environment": payload["environment"]}
        print(payload["mnist"]["targets"], plot_budgets(payload["mnist"]))
    print(write("prune_cpu", payload))


if __name__ == "__main__":
    main()
