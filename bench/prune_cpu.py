"""CPU structured pruning: slimkit vs Torch-Pruning at equal MACs, and vs unstructured magnitude.

(a) ResNet-18-shaped HF model (random init), batch 8 x 3 x 224 x 224: prune to 0.5 MACs with
    slimkit and with Torch-Pruning (same magnitude importance), measure wall-clock speedups
    (interleaved medians) and speedup / MACs reduction.
(b) mnist CNN: accuracy after pruning + the same fine-tuning budget at 0.5 and 0.25 MACs:
    slimkit vs Torch-Pruning vs unstructured magnitude at the same parameter count.
Writes bench/results/prune_cpu.json.

    .venv/bin/python bench/prune_cpu.py [--threads 2] [--steps 300] [--skip-mnist] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, model_latencies, previous_parts, write  # noqa: E402

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


def resnet_part(threads: int, rounds: int) -> dict[str, Any]:
    model = resnet18()
    example = (torch.randn(1, 3, 224, 224),)
    batch = torch.randn(8, 3, 224, 224)
    task = types.SimpleNamespace(example=example)
    base_macs = count_flops(model, example).macs
    contenders: dict[str, nn.Module] = {"fp32": model}
    for r in (None, 8, 16, 32):
        contenders[f"slimkit round_to={r}"] = sk.apply(model, Channels(macs_ratio=0.5, round_to=r), task)
    contenders["torch-pruning"] = tp_to_macs(model, example, 0.5, None)
    contenders["torch-pruning round_to=8"] = tp_to_macs(model, example, 0.5, 8)
    contenders["slimkit auto"] = sk.apply(model, Channels(macs_ratio=0.5), task)
    # the deployed form: slimkit's torch runtime keeps the faster layout (NCHW or channels-last), and
    # so gets the original, so the pruned model is compared with the original at its best too
    contenders["fp32 (runtime layout)"] = build(model, "torch", (batch,), threads=threads)
    contenders["slimkit auto (runtime layout)"] = build(contenders["slimkit auto"], "torch", (batch,), threads=threads)
    times = model_latencies(contenders, (batch,), baseline="fp32", threads=threads, rounds=rounds, min_time_s=0.5)
    rows = {}
    for name, m in contenders.items():
        m = m.model if isinstance(m, ChannelsLast) else m
        macs = count_flops(m, example).macs / base_macs
        speedup = times[name]["speedup"]
        rows[name] = {"macs_ratio": round(macs, 4), "params": params(m), "median_ms": round(times[name]["median_ms"], 2),
                      "min_ms": round(times[name]["min_ms"], 2), "max_ms": round(times[name]["max_ms"], 2),
                      "speedup": round(speedup, 3), "speedup_per_macs_reduction": round(speedup * macs, 3),
                      "stage_widths": [m.resnet.encoder.stages[i].layers[0].shortcut.convolution.out_channels
                                       if hasattr(m.resnet.encoder.stages[i].layers[0].shortcut, "convolution")
                                       else None for i in range(4)]}
    best_tp = max(rows[k]["speedup"] for k in rows if k.startswith("torch-pruning"))
    return {"model": "HF ResNetConfig, ResNet-18 depths, random init", "batch": list(batch.shape),
            "rows": rows, "targets": {
                "slimkit_speedup_at_0.5_macs": {"target": ">= 2.0", "measured": rows["slimkit auto"]["speedup"]},
                "vs_best_torch_pruning": {"target": ">= 1.0", "measured": round(rows["slimkit auto"]["speedup"] / best_tp, 3)},
                "deployed_speedup_at_0.5_macs": {
                    "target": ">= 2.0", "layout": type(contenders["slimkit auto (runtime layout)"]).__name__,
                    "vs_original_as_given": rows["slimkit auto (runtime layout)"]["speedup"],
                    "vs_original_in_its_runtime_layout": round(
                        times["fp32 (runtime layout)"]["median_ms"] / times["slimkit auto (runtime layout)"]["median_ms"], 3)}}}


def mnist_part(threads: int, steps: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    task = sk.zoo.load("mnist")
    base = task.evaluate()["score"]
    base_params = params(task.model)
    result: dict[str, Any] = {"baseline_accuracy": base, "finetune_steps": steps, "rows": {}}

    def tuned(model: nn.Module, *, keep_zeros: bool = False) -> float:
        if keep_zeros:
            with masked(model) as after_step:
                finetune(model, task, steps=steps, after_step=after_step, progress=False, seed=0)
        else:
            finetune(model, task, steps=steps, progress=False, seed=0)
        return task.evaluate(model)["score"]

    for ratio in (0.5, 0.25):
        ours = sk.apply(task.model, Channels(macs_ratio=ratio), task)
        theirs = tp_to_macs(task.model, task.example, ratio, None)
        kept = params(ours) / base_params
        unstructured = sk.apply(task.model, Magnitude(amount=1 - kept), task)
        rows = {"slimkit": ours, "torch-pruning": theirs, "unstructured magnitude": unstructured}
        for name, m in rows.items():
            macs = count_flops(m, task.example).macs / count_flops(task.model, task.example).macs
            pruned_acc = task.evaluate(m)["score"]
            acc = tuned(m, keep_zeros=name.startswith("unstructured"))
            nonzero = sum(int((p != 0).sum()) for p in m.parameters())
            result["rows"][f"{name} @ {ratio} MACs"] = {
                "dense_macs_ratio": round(macs, 4), "nonzero_params_ratio": round(nonzero / base_params, 4),
                "accuracy_after_pruning": pruned_acc, "accuracy_after_finetune": acc, "drop_pt": round(100 * (base - acc), 2)}
    r = result["rows"]
    result["targets"] = {
        "slimkit_0.5_within_1pt": {"target": "<= 1.0 pt", "measured": r["slimkit @ 0.5 MACs"]["drop_pt"]},
        "slimkit_vs_tp_0.5_pt": {"target": ">= 0", "measured": round(100 * (r["slimkit @ 0.5 MACs"]["accuracy_after_finetune"]
                                                                          - r["torch-pruning @ 0.5 MACs"]["accuracy_after_finetune"]), 2)},
        "slimkit_vs_tp_0.25_pt": {"target": ">= 0", "measured": round(100 * (r["slimkit @ 0.25 MACs"]["accuracy_after_finetune"]
                                                                           - r["torch-pruning @ 0.25 MACs"]["accuracy_after_finetune"]), 2)}}
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    import torch_pruning

    payload: dict[str, Any] = {"environment": {**environment(args.threads), "torch_pruning": torch_pruning.__version__}}
    if args.skip_mnist or args.skip_resnet:
        payload.update(previous_parts("prune_cpu", ("resnet18", "mnist")))
    if not args.skip_resnet:
        payload["resnet18"] = resnet_part(args.threads, args.rounds)
        print({k: (v["macs_ratio"], v["speedup"]) for k, v in payload["resnet18"]["rows"].items()})
    if not args.skip_mnist:
        payload["mnist"] = mnist_part(args.threads, args.steps)
        print({k: v["accuracy_after_finetune"] for k, v in payload["mnist"]["rows"].items()})
    print(write("prune_cpu", payload))


if __name__ == "__main__":
    main()
