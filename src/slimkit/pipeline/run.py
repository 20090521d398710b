"""The one path every technique command takes: a recipe applied to a task's model, measured, saved, reported.

``slimkit quantize``, ``prune``, ``distill``, ``factorize`` and ``apply`` each build a
:class:`~slimkit.pipeline.recipe.Recipe` (fine-tuning, a gradual schedule, a student's shrinking are
steps of it) and hand it here. The recipe is replayed exactly as ``slimkit apply recipe.yaml`` would
replay it — same seed, same steps — so the saved artifact and the saved recipe always agree. Training
steps checkpoint under ``OUT/checkpoints`` while the run lasts: a killed run, started again with the
same command, resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Mapping

import torch
import torch.nn as nn
from rich.console import Console

from slimkit import io
from slimkit.core.record import StepView, records_of
from slimkit.core.registry import STAGES, technique_of
from slimkit.core.task import Task
from slimkit.measure._call import pinned_threads
from slimkit.pipeline.candidate import Candidate, measure_candidate
from slimkit.pipeline.comparison import comparison_report, summary, time_together
from slimkit.pipeline.recipe import Recipe
from slimkit.report import Report
from slimkit.runtime import backend_reason
from slimkit.runtime.onnx_file import keep_onnx
from slimkit.train.finetune import checkpointing

log_console = Console()


@dataclasses.dataclass
class RunResult:
    """What a command run produced: the model, the recipe that replays to it, the measured candidates."""

    model: nn.Module
    recipe: Recipe
    candidates: list[Candidate]
    report: Path
    out: Path


def out_of_order(recipe: Recipe) -> list[str]:
    """Steps that come after a step of a later stage (e.g. fusion after quantization folds nothing)."""
    stages = [technique_of(type(s)).stage for s in recipe.steps]
    return [f"{recipe.steps[i].type_name} ({stages[i]}) after a {stages[i - 1]} step"
            for i in range(1, len(stages)) if STAGES.index(stages[i]) < STAGES.index(stages[i - 1])]


def replay(recipe: Recipe, task: Task, out: Path, *, threads: int | None = None,
           console: Console | None = None) -> list[nn.Module]:
    """``recipe.replay_steps(task)`` with training checkpointed under ``out/checkpoints`` (removed when done);
    each step's start and end is a line on ``console``."""
    key = hashlib.sha256(recipe.to_yaml().encode()).hexdigest()[:12]
    ckpt = out / "checkpoints" / key
    announce = (lambda line: console.print(f"[dim]{line}[/]")) if console is not None else None
    with pinned_threads(threads), checkpointing(ckpt):
        models = recipe.replay_steps(task, announce=announce)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return models


def run_recipe(task: Task, recipe: Recipe, out: str | Path, *, title: str, label: str | None = None,
               controls: Mapping[str, Recipe] | None = None, intermediate: bool = False, compute: bool = True,
               threads: int | None = None, console: Console | None = None) -> RunResult:
    """Replay ``recipe`` on ``task``, measure it against the original (and ``controls``, other recipes
    the report compares with), save ``OUT/model`` + ``OUT/recipe.yaml``, write ``OUT/report.html``.

    ``intermediate`` also measures the model after every step but the last (e.g. factorized, then
    fine-tuned). Backend: the last step's ``backend`` option when it has one, else the measured default.
    """
    console = console or log_console
    out = Path(out)
    for warning in out_of_order(recipe):
        console.print(f"[yellow]warning[/] step order: {warning}")
    console.print(f"[bold]task[/] {task.name}: {task.description}")
    candidates = [measure_candidate("baseline", task.model, [], task, threads=threads)]
    models = replay(recipe, task, out, threads=threads, console=console)
    model = models[-1]
    if intermediate:
        for i, step in enumerate(recipe.steps[:-1], 1):
            candidates.append(measure_candidate(f"after {step.type_name}", models[i], recipe.steps[:i], task,
                                                threads=threads))
    for name, control in (controls or {}).items():
        control_model = replay(control, task, out / "controls", threads=threads)[-1]
        candidates.append(measure_candidate(name, control_model, control.steps, task, threads=threads))
    backend = getattr(recipe.steps[-1], "backend", "auto") if recipe.steps else "auto"
    backend = recipe.backend if backend == "auto" else backend  # a searched recipe names the runtime it was scored on
    final = measure_candidate(label or " + ".join(s.type_name for s in recipe.steps) or "original", model,
                              recipe.steps, task, backend=backend, threads=threads)
    candidates.append(final)
    timed = time_together(task, candidates, threads=threads)
    io.save(model, out / "model", recipe=[c.to_dict() for c in recipe.steps],
            extra={"task": task.name, "seed": recipe.seed, "backend": final.backend})
    recipe.save(out / "recipe.yaml")
    onnx = keep_onnx(final.runnable, out)  # the file that was measured, deployable with onnxruntime alone
    reload_diff = _reload_diff(model, out / "model", task)
    report = _report(title, task, recipe, models, candidates, compute, backend, reload_diff)
    report.data["speed"] = timed.to_dict()
    report.data["onnx"] = str(onnx) if onnx else f"none: {backend_reason(model, backend)}"
    path = report.write(out)
    console.print(summary(candidates[0], final) + f", params {candidates[0].profile.params_total:,} -> "
                  f"{final.profile.params_total:,} ({final.profile.artifact_bytes / max(final.profile.params_total, 1):.2f}"
                  " bytes/param)")
    if onnx:
        console.print(f"[green]onnx[/] {onnx} (the measured file; inputs and outputs in {onnx.name}.json)")
    console.print(f"[green]report[/] {path}")
    return RunResult(model=model, recipe=recipe, candidates=candidates, report=path, out=out)


def _reload_diff(model: nn.Module, path: Path, task: Task) -> float:
    """Max |difference| between the model's and its reloaded artifact's outputs on the example."""
    loaded = io.load(path)
    with torch.inference_mode():
        a, b = model.eval()(*task.example), loaded(*task.example)
    a = a[0] if isinstance(a, (tuple, list)) else a
    b = b[0] if isinstance(b, (tuple, list)) else b
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def _report(title: str, task: Task, recipe: Recipe, models: list[nn.Module], candidates: list[Candidate],
            compute: bool, backend: str, reload_diff: float) -> Report:
    r = comparison_report(title, "Measured on the deployed runtime", task, candidates, compute=compute,
                          recipe=recipe.to_dict(), steps=[rec.to_dict() for rec in records_of(models[-1])],
                          reload_max_abs_diff=reload_diff, backend=backend_reason(models[-1], backend))
    r.note("Size: bytes of the saved artifact. Latency and metric: the model running on the runtime named in "
           f"the runtime column ({backend_reason(models[-1], backend)}). The saved artifact reloads with outputs "
           f"within {reload_diff:.2e} of the model's; OUT/recipe.yaml replays to it (slimkit apply).")
    r.note("Speedup: the original and every candidate timed in the same alternating rounds at the end of the "
           "run, on the same threads (median of the per-round ratios; a range marked noisy when other work "
           "shared the machine)." + "".join(
               f" {c.name} vs the original on {c.backend}: {c.speedup_same_runtime.text()}."
               for c in candidates[1:] if c.speedup_same_runtime is not None and c.backend != candidates[0].backend))
    for c in candidates[1:]:
        if c.emulated:
            r.note(f"{c.name}: no speed claim. {c.emulated}.")
    runnable = candidates[-1].runnable
    if hasattr(runnable, "kernels"):  # what the runtime really runs (ONNX Runtime op types, GPU kernels)
        r.data["runtime_ops"] = dict(runnable.kernels)
    r.data["kernels"] = {n: m.kernel for n, m in models[-1].named_modules() if isinstance(getattr(m, "kernel", None), str)}
    kept = getattr(runnable, "skipped", {}) or {}
    if kept:
        r.heading("Layers the runtime kept in float")
        r.table(["layer", "reason"], [[n, why] for n, why in kept.items()])
    for i, step in enumerate(recipe.steps):
        for record in records_of(models[i + 1])[len(records_of(models[i])):]:
            technique_of(type(step)).config.report_section(r, record, StepView(models[i], models[i + 1], task))
    r.heading("Recipe")
    r.pre(recipe.to_yaml())
    return r
