"""``slimkit prune``: prune a task's model, fine-tune it with the pruning kept, measure, save and report."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit import io, zoo
from slimkit.candidate import measure_candidate
from slimkit.config import BaseConfig, apply
from slimkit.errors import SlimkitError
from slimkit.job import comparison_report, summary, with_options
from slimkit.measure._call import pinned_threads
from slimkit.prune.channels import Channels
from slimkit.prune.magnitude import Magnitude
from slimkit.prune.masks import global_sparsity, layer_sparsity, masked, record
from slimkit.prune.nm import NM
from slimkit.prune.plots import sparsity_heatmap, sparsity_trend
from slimkit.prune.schedule import CubicPruner
from slimkit.report import Report

METHODS: dict[str, BaseConfig] = {"channels": Channels(), "magnitude": Magnitude(), "nm": NM()}
SCHEDULES = ("one-shot", "gradual")
GRADUAL_STEPS = 10  # pruning steps of the cubic schedule (Zhu & Gupta use ~10-100; 10 suits short runs)


def make_config(method: str, **options: Any) -> BaseConfig:
    """The method's config with the options the user set; options of another method are an error."""
    if method not in METHODS:
        raise SlimkitError(f"unknown pruning method {method!r}", f"use one of {', '.join(METHODS)}")
    if options.get("nm_method") is not None:  # the CLI's --nm-method is the NM config's own ``method``
        if method != "nm":
            raise SlimkitError(f"--nm-method does not apply to {method}", "use it with --method nm")
        options["method"] = options.pop("nm_method")
    options.pop("nm_method", None)
    return with_options(METHODS[method], method, **options)


def run(task_name: str, config: BaseConfig, out: str | Path, *, finetune_steps: int = 0, lr: float | None = None,
        schedule: str = "one-shot", threads: int | None = None) -> Path:
    """Prune, fine-tune (masks kept), measure against the unpruned baseline, write artifact + report."""
    from rich.console import Console

    _check(config, finetune_steps, schedule)
    console = Console()
    out = Path(out)
    task = zoo.load(task_name)
    if finetune_steps and (not task.train or task.loss is None):
        raise SlimkitError(f"task {task.name!r} has no training data (train and loss) to fine-tune on",
                           "run with --finetune-steps 0, or give the Task train batches and a loss")
    console.print(f"[bold]task[/] {task.name}: {task.description}")
    baseline = measure_candidate("baseline", task.model, [], task, threads=threads)
    history: list[tuple[int, float]] = []
    snapshots: list[tuple[int, dict[str, float]]] = []
    train: dict[str, Any] = {"steps": finetune_steps, "schedule": schedule}
    if schedule == "gradual":
        model = copy.deepcopy(task.model)
        pruner = _Gradual(model, config, finetune_steps, snapshots)
        pruner.prune(model, 0)  # the schedule's starting point (sparsity 0) for the trend and heatmap
        train.update(_finetune(model, task, finetune_steps, lr, pruner, threads, restore_best=False))
        record(model, config, pruner.names, pruner.skipped)
        history = pruner.history + [(finetune_steps, global_sparsity(model, pruner.names))]
    else:
        model = apply(task.model, config, task)
        if finetune_steps and isinstance(config, Channels):  # removed channels cannot come back
            train.update(_finetune(model, task, finetune_steps, lr, None, threads))
        elif finetune_steps:
            with masked(model) as after_step:
                train.update(_finetune(model, task, finetune_steps, lr, after_step, threads))
    info = dict(model.slimkit_prune)
    if not isinstance(config, Channels):
        info["layers"] = layer_sparsity(model, list(info["layers"]))
        info["sparsity"] = global_sparsity(model, list(info["layers"]))
    candidate = measure_candidate(f"pruned ({config.type_name})", model, [config], task, threads=threads)
    info["macs_ratio"] = candidate.profile.macs / max(baseline.profile.macs, 1)
    info["history"] = history
    io.save(model, out / "model", recipe=[config.to_dict()], extra={"task": task.name, "pruning": info})
    report = _report(task, [baseline, candidate], info, train, out, snapshots)
    path = report.write(out)
    console.print(summary(baseline, candidate) + f", MACs x{info['macs_ratio']:.2f}, "
                  f"params {baseline.profile.params_total} -> {candidate.profile.params_total}")
    console.print(f"[green]report[/] {path}")
    return path


def _check(config: BaseConfig, finetune_steps: int, schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise SlimkitError(f"unknown schedule {schedule!r}", f"use one of {', '.join(SCHEDULES)}")
    if finetune_steps < 0:
        raise SlimkitError(f"finetune_steps={finetune_steps} is negative", "use 0 (no fine-tuning) or more")
    if schedule == "gradual" and not isinstance(config, Magnitude):
        raise SlimkitError(f"the gradual schedule applies to magnitude pruning, not {config.type_name}",
                           "use --method magnitude, or --schedule one-shot")
    if schedule == "gradual" and finetune_steps < 2 * GRADUAL_STEPS:
        raise SlimkitError(f"a gradual schedule needs fine-tuning between its {GRADUAL_STEPS} pruning steps",
                           f"give --finetune-steps {20 * GRADUAL_STEPS} or more")


class _Gradual(CubicPruner):
    """Cubic schedule inside one fine-tuning run, recovering for one interval after the last pruning step."""

    def __init__(self, model: nn.Module, config: Magnitude, steps: int,
                 snapshots: list[tuple[int, dict[str, float]]]) -> None:
        super().__init__(model, final=config.amount, every=steps // (GRADUAL_STEPS + 1), n=GRADUAL_STEPS,
                         scope=config.scope, targets=config.targets, exclude=config.exclude)
        self.snapshots = snapshots

    def prune(self, model: nn.Module, step: int) -> float:
        reached = super().prune(model, step)
        self.snapshots.append((step, layer_sparsity(model, self.names)))
        return reached


def _finetune(model: nn.Module, task: Any, steps: int, lr: float | None, after_step: Any, threads: int | None,
              restore_best: bool = True) -> dict[str, Any]:
    """Fine-tune on ``threads`` too: tiny steps on 2 busy cores run ~5x faster on one thread than on two."""
    from slimkit.train import finetune

    kwargs = {} if lr is None else {"lr": lr}
    with pinned_threads(threads):
        result = finetune(model, task, steps=steps, after_step=after_step, restore_best=restore_best,
                          eval_every=0 if not restore_best else max(1, steps // 5), **kwargs)
    return {"lr": lr, "evals": result.evals, "best_step": result.best_step, "seconds": result.seconds}


def _report(task: Any, candidates: list[Any], info: dict[str, Any], train: dict[str, Any], out: Path,
            snapshots: list[tuple[int, dict[str, float]]]) -> Report:
    method = info["config"]["type"]
    r = comparison_report(f"slimkit pruning — {task.name}", "Baseline vs pruned", task, candidates, compute=True,
                          pruning=info, finetune=train)
    r.note(f"{method}, {train['schedule']}, fine-tuned {train['steps']} steps. Size: bytes of the saved artifact "
           "(zeros stored sparsely); MACs ratio: pruned MACs / baseline MACs.")
    if info.get("skipped"):
        r.heading("Layers left intact")
        r.table(["layer", "reason"], [[n, why] for n, why in info["skipped"].items()])
    if method == "prune.Channels":
        layers = info["layers"]
        r.heading("Output width per layer")
        r.table(["layer", "before", "after", "kept"], [[n, b, a, a / b] for n, (b, a) in layers.items()])
        if layers:
            r.bar_plot("output channels per layer", list(layers),
                       {"before": [b for b, _ in layers.values()], "after": [a for _, a in layers.values()]},
                       "channels / neurons")
        if info.get("heads"):
            r.table(["attention", "heads removed"], [[n, str(v)] for n, v in info["heads"].items()])
        return r
    r.heading(f"Sparsity per layer (overall {info['sparsity']:.3f})")
    r.table(["layer", "sparsity"], list(info["layers"].items()))
    heatmap = sparsity_heatmap(snapshots or info["layers"], out / "sparsity_heatmap.png")
    pictures = [heatmap.name]
    if info["history"]:
        pictures.append(sparsity_trend(info["history"], out / "sparsity_trend.png",
                                       target=info["config"]["amount"]).name)
    r.note(f"Pictures next to this report: {', '.join(pictures)}.")
    return r
