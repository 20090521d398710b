"""The search report: one self-contained HTML page (inline PNG plots, no network) plus its JSON twin.

Baseline vs best (bytes, params, MACs, latency p50/p95, memory, metric, each on its runtime), the
Pareto front with the feasible region shaded and the best marked, every trial, per-layer
sensitivity, the best model's sparsity and quantization error, the recipe, layers left alone and
why, and the environment the numbers were measured in.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from slimkit.core.record import StepView, records_of, skipped_layers
from slimkit.core.registry import technique_named
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.core.versions import versions
from slimkit.measure.speed_ratio import SpeedRatio
from slimkit.pipeline.candidate import Candidate, measure_candidate
from slimkit.pipeline.comparison import comparison_report, time_together
from slimkit.pipeline.recipe import Recipe
from slimkit.prune.plots import sparsity_heatmap
from slimkit.report import Report
from slimkit.report.html import pyplot_or_none
from slimkit.report.metric_change import METRIC_CHANGE, change_text, metric_change, sign_note
from slimkit.runtime.onnx_file import keep_onnx
from slimkit.search.result import OptimizeResult, write_result
from slimkit.train.masks import PRUNABLE


def environment(threads: int | None) -> dict[str, Any]:
    """Where the numbers came from: CPU model, cores, threads, GPU, library versions."""
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, **versions()}
    for lib in ("onnxruntime", "optuna"):
        try:
            env[lib] = __import__(lib).__version__
        except ImportError:
            pass
    return env


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(result: OptimizeResult, task: Task) -> Path:
    """Measure baseline and best side by side, render every section, write report.html/.json + result.json."""
    out = Path(result.out)
    threads = result.target.threads
    candidates = [measure_candidate("original", task.model, [], task, threads=threads)]
    if result.best_model is not None:
        candidates.append(measure_candidate(f"best (trial {result.best.number})", result.best_model,
                                            [], task, threads=threads))
    if len(candidates) > 1:
        result.speed = confirmed_speed(result, task, candidates)
        onnx = keep_onnx(candidates[-1].runnable, out, BEST_ONNX)  # the best as measured, for onnxruntime alone
        result.speed["onnx"] = str(onnx) if onnx else None
    data = result.to_dict()
    data["environment"] = environment(threads)
    verdict = ("best: " + result.best.label()) if result.best else "no candidate met the target"
    r = comparison_report(f"slimkit optimize — {task.name}", f"Original vs best ({verdict})", task, candidates,
                          compute=True, search=data)
    r.table(["candidate", "latency p50 ms", "latency p95 ms", "runs"],
            [[c.name, c.latency.p50_ms, c.latency.p95_ms, c.latency.runs] for c in candidates])
    r.note(f"Target: {_target_text(result.target)}. {len(result.trials)} trials in {result.seconds:.0f} s"
           + (f"; first fit after {result.first_feasible['trials']} trials, {result.first_feasible['seconds']:.0f} s"
              if result.first_feasible else "") + "." + (f" Stopped: {result.stopped}." if result.stopped else "")
           + (f" {SOURCES[result.best_source]}" if result.best_source in SOURCES else ""))
    if not result.best:
        r.heading("Why nothing fit")
        for hint in result.hints:
            r.note(hint)
        r.table(["trial", "pipeline"] + [f"{n} margin" for n in result.target.names()],
                [[c.number, c.label()] + [("not measured" if v >= 1e9 else v) for v in c.constraints]
                 for c in result.closest])
    r.heading("Pareto front (metric drop, size, latency)")
    _pareto_plot(r, result, task)
    r.heading("All trials")
    r.table(["trial", "pipeline", "MB", "ms", "metric", METRIC_CHANGE, "fits", "s", "note"],
            [[t.number, t.label(), t.measured.size_mb, t.measured.latency_ms, t.measured.score,
              None if t.measured.score is None else metric_change(t.measured.score, result.baseline.score),
              "yes" if t.feasible else "no", t.measured.seconds,
              t.measured.error or (f"over {t.measured.stopped_at} limit" if t.measured.stopped_at else "")
              or (t.measured.latency_check or {}).get("text", "")]
             for t in result.trials])
    r.note(sign_note(task.metric_name, task.higher_is_better))
    _time_spent(r, result)
    if result.sensitivity:
        r.heading("Per-layer sensitivity of the original (metric drop, that layer alone at int4)")
        names = list(result.sensitivity)
        r.bar_plot("per-layer sensitivity", names, {"metric drop": [result.sensitivity[n] for n in names]},
                   "metric drop")
    if result.best_model is not None:
        _best_details(r, result, task)
    r.heading("Environment")
    r.table(["what", "value"], [[k, v] for k, v in data["environment"].items()])
    path = r.write(out)
    write_result(result, data)
    return path


#: What the report says of ``best/``, by ``OptimizeResult.best_source``.
SOURCES = {"incumbent": "best/ is the best trial's model as saved when that trial finished (copied, not rebuilt); "
                        "slimkit apply recipe.yaml rebuilds it from the recipe to check.",
           "replayed": "best/ was rebuilt at the end by replaying the best trial's recipe (its saved copy was "
                       "missing or could not be used)."}


def _time_spent(r: Report, result: OptimizeResult) -> None:
    """Where the command's seconds went: its own phases, then each trial's steps and measurements."""
    per_phase: dict[str, list[float]] = {}
    for t in result.trials:
        for phase, seconds in (t.measured.timings or {}).items():
            per_phase.setdefault(phase, []).append(seconds)
    if not per_phase and not result.phases:
        return
    r.heading("Where the time went")
    if result.phases:
        r.table(["part of the search", "seconds"], [[k, v] for k, v in result.phases.items()])
    if per_phase:
        order = sorted(per_phase, key=lambda k: -sum(per_phase[k]))
        r.table(["inside the trials", "trials", "total s", "median s", "slowest s"],
                [[k, len(per_phase[k]), sum(per_phase[k]), statistics.median(per_phase[k]), max(per_phase[k])]
                 for k in order])
        r.bar_plot("seconds spent in the trials, per step", order, {"total s": [sum(per_phase[k]) for k in order]},
                   "seconds")


def _target_text(target: Target) -> str:
    parts = [f"{n} <= {getattr(target, 'max_' + n):g}" for n in target.names()]
    return ", ".join(parts) + f" on {target.device}" + (f", {target.threads} threads" if target.threads else "")


def _best_details(r: Report, result: OptimizeResult, task: Task) -> None:
    model = result.best_model
    r.heading("Recipe (replay with: slimkit apply recipe.yaml --task ... --out ...)")
    saved = Path(result.out) / "recipe.yaml" if result.out is not None else None
    r.pre(saved.read_text() if saved is not None and saved.is_file()
          else Recipe.from_steps(result.best.recipe, task=task.name).to_yaml())
    skipped = {**skipped_layers(model),
               **{name: f"{result.best.measured.backend}: {why}"
                  for name, why in (result.best.measured.runtime_skipped or {}).items()}}
    r.heading("Layers left unchanged, and why")
    if skipped:
        r.table(["layer", "reason"], [[n, why] for n, why in skipped.items()])
    else:
        r.note("none: every selected layer was compressed")
    _sparsity(r, model)
    for record in records_of(model):  # each step's own section (quantization error against the float model...)
        quantizes = technique_named(record.technique).stage == "quantize"
        view = StepView(result.before_quantize if quantizes else None, model, task)
        technique_named(record.technique).config.report_section(r, record, view)


def _sparsity(r: Report, model: Any) -> None:
    layers = {f"{n} ({type(m).__name__})": float((m.weight == 0).float().mean()) for n, m in model.named_modules()
              if isinstance(m, PRUNABLE) and m.weight.is_floating_point()}  # names with their types, as in the tables
    if not layers or max(layers.values()) < 0.01:
        return
    r.heading("Sparsity of the best model per layer")
    with tempfile.TemporaryDirectory() as tmp:
        r.image(sparsity_heatmap(layers, Path(tmp) / "sparsity.png", title="sparsity per layer"), "sparsity heatmap")


def _pareto_plot(r: Report, result: OptimizeResult, task: Task) -> None:
    plt = pyplot_or_none()
    done = [t for t in result.trials if t.evaluated]
    if plt is None or not done:
        r.note("no evaluated candidate to plot" if plt is not None else "[plot skipped: matplotlib missing]")
        return
    from matplotlib.patches import Rectangle  # matplotlib: optional (report extra), present once pyplot is

    base = result.baseline
    sign = 1 if task.higher_is_better else -1
    front = {t.number for t in result.pareto}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, limit, label in ((axes[0], "size_mb", result.target.max_size_mb, "artifact MB"),
                                  (axes[1], "latency_ms", result.target.max_latency_ms, "latency p50 ms")):
        xs = [getattr(t.measured, key) for t in done]
        ys = [t.measured.score for t in done]
        colors = ["tab:blue" if t.feasible else "lightgray" for t in done]
        ax.scatter(xs, ys, c=colors, s=28, zorder=3, label="candidates (blue: fits)")
        pts = sorted((getattr(t.measured, key), t.measured.score) for t in done if t.number in front)
        if pts:
            ax.plot(*zip(*pts), color="tab:orange", lw=1, zorder=2, label="Pareto front")
        ax.scatter([getattr(base, key)], [base.score], marker="s", c="black", zorder=4, label="original")
        if result.best is not None:
            ax.scatter([getattr(result.best.measured, key)], [result.best.measured.score], marker="*", s=220,
                       c="tab:red", zorder=5, label="best")
        x_hi = limit if limit is not None else max(xs + [getattr(base, key)]) * 1.1
        floor = base.score - sign * (result.target.max_drop if result.target.max_drop is not None else 1e9)
        y_lo, y_hi = ax.get_ylim()
        y0, y1 = (max(floor, y_lo), y_hi) if sign > 0 else (y_lo, min(floor, y_hi))
        x_lo = min(xs + [getattr(base, key)]) / 2
        ax.add_patch(Rectangle((x_lo, y0), x_hi - x_lo, y1 - y0, color="tab:green", alpha=0.12, zorder=1,
                               label="feasible region"))
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(task.metric_name)
        ax.legend(fontsize=7)
    fig.suptitle("candidates: metric vs size and latency")
    r.figure(fig, "Pareto front")


#: The best candidate's measured ONNX file in the run directory (when it runs on ONNX Runtime).
BEST_ONNX = "best.onnx"


def confirmed_speed(result: OptimizeResult, task: Task, candidates: list[Candidate]) -> dict[str, Any]:
    """The original and the best timed together at the end of the run, and the latency limit checked
    against that timing (a relative limit against the re-timed original, not the first timing)."""
    timed = time_together(task, candidates, threads=result.target.threads)
    best = candidates[-1]
    speed: dict[str, Any] = {"vs_original": best.speedup.to_dict(), "text": best.speed_text(candidates[0]),
                             "same_runtime": best.speedup_same_runtime.to_dict(), "backend": best.backend,
                             "emulated": best.emulated, "timings": timed.to_dict()}
    target = result.target
    if target.max_latency_ms is not None or target.max_latency_vs_original is not None:
        original_ms = timed.timings["original"].p50_ms
        best_ms = timed.timings[next(k for k in timed.timings if k.startswith("1: "))].p50_ms
        limit = target.max_latency_ms
        if target.max_latency_vs_original is not None:  # the re-timed original, not the search's first timing
            limit = target.max_latency_vs_original * original_ms
        speed["latency_confirmed"] = best_ms <= limit
        speed["latency_check"] = (f"re-timed together with the original ({original_ms:.3g} ms p50), the best runs "
                                  f"at {best_ms:.3g} ms p50 against a limit of {limit:.3g} ms")
    return speed


def speed_line(result: OptimizeResult) -> str:
    """``3.51x faster`` from the final timing together; both ratios when the best runs on another runtime."""
    speed = result.speed
    if not speed:
        return "speed not re-timed (no report written)"
    if speed["emulated"]:
        return "speed not claimed (static int8 emulated in fp32 on torch here)"
    line = f"{speed['text']} faster"
    if speed["backend"] != "torch":
        line += (f" than the original as given (torch); vs the original on {speed['backend']}: "
                 f"{SpeedRatio(**speed['same_runtime']).text()}")
    return line


def print_summary(result: OptimizeResult) -> None:
    """The console view of a finished search: original vs best, the ratios, or the hints when nothing fit."""
    console = Console()
    r = result  # OptimizeResult
    table = Table(title=f"{r.task}: original vs best of {len(r.trials)} trials")
    for col in ("", "MB", "latency ms", "metric", METRIC_CHANGE, "pipeline"):
        table.add_column(col)
    b = r.baseline
    table.add_row("original", f"{b.size_mb:.4g}", f"{b.latency_ms:.3g}", f"{b.score:.4f}", "", "")
    if r.best is not None:
        m = r.best.measured
        table.add_row(f"best (#{r.best.number})", f"{m.size_mb:.4g}", f"{m.latency_ms:.3g}", f"{m.score:.4f}",
                      change_text(metric_change(m.score, b.score)), r.best.label())
    console.print(table)
    if r.best is not None:
        console.print(f"{b.size_mb / r.best.measured.size_mb:.1f}x smaller, " + speed_line(r))
        if r.speed and r.speed.get("latency_confirmed") is False:
            console.print(f"[yellow]latency limit not confirmed[/]: {r.speed['latency_check']}")
    else:
        console.print("[red]no candidate met the target[/]")
        for hint in r.hints:
            console.print(f"  - {hint}")
    if r.out is not None:
        if r.speed and r.speed.get("onnx"):
            console.print(f"[green]onnx[/] {r.speed['onnx']} (the best as measured; runs with onnxruntime alone)")
        console.print(f"[green]report[/] {Path(r.out) / 'report.html'}")
