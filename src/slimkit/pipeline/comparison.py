"""How every run is compared: options onto a config, the baseline-vs-candidates table, the one-line summary.

Every command reports the same way — the baseline and its candidates measured by
:func:`slimkit.pipeline.candidate.measure_candidate`, side by side — so a reader can compare reports of
different techniques column for column.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.core.versions import versions
from slimkit.measure._call import pinned_threads
from slimkit.measure.speed_ratio import SpeedComparison, compare_speed
from slimkit.pipeline.candidate import ROW_HEADER, Candidate
from slimkit.report import Report
from slimkit.report.metric_change import METRIC_CHANGE, change_text, metric_change, sign_note
from slimkit.runtime import build

COMPUTE_HEADER = ["params", "MACs", "MACs ratio"]


def with_options(base: BaseConfig, label: str, **overrides: Any) -> BaseConfig:
    """``base`` with the options the user set (``None`` = keep its value); options it lacks are an error."""
    fields = {f.name for f in dataclasses.fields(base)}
    given = {k: v for k, v in overrides.items() if v is not None}
    wrong = sorted(set(given) - fields)
    if wrong:
        raise SlimkitError(f"option(s) {', '.join(wrong)} do not apply to {label}",
                           f"{label} takes: {', '.join(sorted(fields)) or 'no options'}")
    return dataclasses.replace(base, **given)


def comparison_report(title: str, heading: str, task: Task, candidates: list[Candidate], *, compute: bool = False,
                      **data: Any) -> Report:
    """A report opening with the baseline-vs-candidates table; ``data`` goes into report.json.

    ``compute`` adds params and MACs columns (what structured pruning changes; quantization does not).
    """
    base = candidates[0]
    r = Report(title=title)
    final = candidates[-1]  # layer types, pruned widths and the runtime's kernels are the final model's
    r.describe_run(base.model, final.model, final.backend, getattr(final.runnable, "layer_kernels", None))
    if final.profile is not None:
        r.layer_profile(final.name, final.profile.layers)
    r.data = {"task": task.name, "candidates": [c.to_dict() for c in candidates], **data, "versions": versions()}
    r.heading(heading)
    rows = [c.row(base, task.higher_is_better) for c in candidates]
    if compute:
        rows = [row + [c.profile.params_total, c.profile.macs, c.profile.macs / max(base.profile.macs, 1)]
                for row, c in zip(rows, candidates)]
    r.table(ROW_HEADER + (COMPUTE_HEADER if compute else []), rows)
    r.note(sign_note(task.metric_name, task.higher_is_better))
    return r


def time_together(task: Task, candidates: list[Candidate], *, threads: int | None = None) -> SpeedComparison:
    """Time the original and every candidate in the same rounds, at the end of the run, on the same threads;
    the original is also run on each other runtime a candidate uses. Sets each candidate's speedups."""
    baseline = candidates[0]
    contenders: dict[str, Callable[[], Any]] = {"original": _call(baseline.runnable, task)}
    for backend in sorted({c.backend for c in candidates[1:]} - {baseline.backend}):
        contenders[f"original on {backend}"] = _call(build(task.model, backend, task.example, threads=threads), task)
    for i, c in enumerate(candidates[1:], 1):
        contenders[f"{i}: {c.name}"] = _call(c.runnable, task)
    with pinned_threads(threads), torch.inference_mode():
        timed = compare_speed(contenders)
    for i, c in enumerate(candidates[1:], 1):
        c.speedup = timed.ratio("original", f"{i}: {c.name}")
        same = "original" if c.backend == baseline.backend else f"original on {c.backend}"
        c.speedup_same_runtime = timed.ratio(same, f"{i}: {c.name}")
    return timed


def _call(runnable: Any, task: Task) -> Callable[[], Any]:
    return lambda: runnable(*task.example)


def summary(baseline: Candidate, candidate: Candidate) -> str:
    """One line for the console: metric against the baseline, size and speed ratios (both when the
    candidate runs on another runtime than the original: as given, and on the same runtime)."""
    speed = candidate.speed_text(baseline) + " faster"
    if candidate.emulated:
        speed = "speed not claimed (static int8 emulated in fp32 on torch here)"
    elif candidate.speedup is not None and candidate.backend != baseline.backend:
        speed += f" than the original as given ({baseline.backend}); vs the original on {candidate.backend}: " \
                 f"{candidate.speedup_same_runtime.text()}"
    change = change_text(metric_change(candidate.metric["score"], baseline.metric["score"]))
    return (f"{candidate.name} on {candidate.backend}: metric {candidate.metric['score']:.4f} "
            f"(baseline {baseline.metric['score']:.4f}, {METRIC_CHANGE} {change}), "
            f"{baseline.profile.artifact_bytes / candidate.profile.artifact_bytes:.2f}x smaller, {speed}")
