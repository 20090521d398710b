"""``slimkit factorize``: factorize a task's model, recover (fine-tune or distill), measure, save, report."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from slimkit import io, zoo
from slimkit.candidate import measure_candidate
from slimkit.config import BaseConfig, apply
from slimkit.errors import SlimkitError
from slimkit.factorize.cp import CP
from slimkit.factorize.layers import chosen_layers
from slimkit.factorize.svd import SVD
from slimkit.factorize.tucker import Tucker
from slimkit.job import comparison_report, summary
from slimkit.report import Report

METHODS = ("svd", "tucker", "cp")


def make_config(method: str, ratio: float, *, targets: str | None = None, exclude: tuple[str, ...] = (),
                energy: float | None = None, sensitivity: bool = False) -> BaseConfig:
    """The method's config; ``ratio`` is the fraction of each factorized layer's weights kept."""
    if method not in METHODS:
        raise SlimkitError(f"unknown factorization method {method!r}", f"use one of {', '.join(METHODS)}")
    if method != "svd" and (energy is not None or sensitivity):
        raise SlimkitError(f"--energy and --sensitivity choose SVD ranks, not {method} ranks", "use --method svd")
    if method == "svd":
        return SVD(rank_ratio=ratio, energy=energy, allocation="sensitivity" if sensitivity else "uniform",
                   targets=targets or "all", exclude=exclude)
    cls = Tucker if method == "tucker" else CP
    return cls(ratio=ratio, targets=targets or "all", exclude=exclude)


def recovery_config(task: Any, steps: int, distill: bool, lr: float | None) -> BaseConfig | None:
    """Distillation from the original model, or plain fine-tuning on the labels, for ``steps`` steps."""
    if steps <= 0:
        return None
    if not task.train:
        raise SlimkitError(f"task {task.name!r} has no training data to recover on", "run with --finetune-steps 0")
    if distill:
        from slimkit.distill import Distill

        return Distill(steps=steps, lr=lr or 1e-3, alpha=0.5)
    if task.loss is None:
        raise SlimkitError(f"task {task.name!r} has no labels to fine-tune on", "add --distill (needs no labels)")
    from slimkit.train.recover import Finetune

    return Finetune(steps=steps, lr=lr or 1e-3)


def run(task_name: str, config: BaseConfig, out: str | Path, *, finetune_steps: int = 0, distill: bool = False,
        lr: float | None = None, threads: int | None = None) -> Path:
    """Factorize, recover, measure against the original, write ``OUT/model`` and the report."""
    from rich.console import Console

    if finetune_steps < 0:
        raise SlimkitError(f"finetune_steps={finetune_steps} is negative", "use 0 (no recovery) or more")
    console = Console()
    out = Path(out)
    task = zoo.load(task_name)
    recover = recovery_config(task, finetune_steps, distill, lr)
    chosen_layers(task.model, config.targets, config.exclude, config.type_name)  # bad names fail before any work
    console.print(f"[bold]task[/] {task.name}: {task.description}")
    baseline = measure_candidate("baseline", task.model, [], task, threads=threads)
    model = apply(task.model, config, task)
    info = dict(model.slimkit_factorize)
    candidates = [baseline, measure_candidate(f"factorized ({config.type_name})", model, [config], task,
                                              threads=threads)]
    recipe = [config]
    if recover is not None:
        model = copy.deepcopy(model)
        _recover(model, task, recover, threads)
        recipe.append(recover)
        label = "distilled" if distill else "fine-tuned"
        candidates.append(measure_candidate(f"{label} {finetune_steps} steps", model, recipe, task, threads=threads))
    io.save(model, out / "model", recipe=[c.to_dict() for c in recipe],
            extra={"task": task.name, "factorize": info})
    info["reload_max_abs_diff"] = _reload_diff(model, out / "model", task)
    report = _report(task, candidates, info, recover)
    path = report.write(out)
    console.print(summary(baseline, candidates[-1]) + f", params {info['params'][0]} -> {info['params'][1]}")
    console.print(f"[green]report[/] {path}")
    return path


def _recover(model: torch.nn.Module, task: Any, recover: BaseConfig, threads: int | None) -> None:
    """Run the recovery step in place, with a progress bar (the registered handlers run without one)."""
    from slimkit.distill import Distill, distill
    from slimkit.measure._call import pinned_threads
    from slimkit.train import finetune

    if isinstance(recover, Distill):
        distill(model, task, recover, threads=threads)
        return
    with pinned_threads(threads):
        finetune(model, task, steps=recover.steps, lr=recover.lr, seed=recover.seed)


def _reload_diff(model: torch.nn.Module, path: Path, task: Any) -> float:
    """Max |difference| between the model's and its reloaded artifact's outputs on the example."""
    loaded = io.load(path)
    with torch.inference_mode():
        a, b = model.eval()(*task.example), loaded(*task.example)
    return float((a - b).abs().max())


def _report(task: Any, candidates: list[Any], info: dict[str, Any], recover: BaseConfig | None) -> Report:
    method = info["config"]["type"]
    r = comparison_report(f"slimkit factorization — {task.name}", "Baseline vs factorized", task, candidates,
                          compute=True, factorize=info, recovery=None if recover is None else recover.to_dict())
    before, after = info["params"]
    r.note(f"{method}: parameters {before} -> {after} ({before / after:.2f}x fewer). Recovery: "
           f"{'none' if recover is None else recover.type_name}. The saved artifact reloads with outputs within "
           f"{info['reload_max_abs_diff']:.2e} of the model's.")
    r.heading("Factorized layers")
    rows = [[n, v["method"], str(v["rank"]), v["params_before"], v["params_after"],
             v["params_after"] / v["params_before"]] for n, v in info["layers"].items()]
    r.table(["layer", "method", "rank", "params before", "params after", "kept"], rows)
    if info["layers"]:
        names = list(info["layers"])
        r.bar_plot("parameters per layer", names, {"before": [info["layers"][n]["params_before"] for n in names],
                                                   "after": [info["layers"][n]["params_after"] for n in names]},
                   "parameters")
    if info["skipped"]:
        r.heading("Layers left intact")
        r.table(["layer", "reason"], [[n, why] for n, why in info["skipped"].items()])
    return r
