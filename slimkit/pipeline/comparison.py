"""How every run is compared: options onto a config, the baseline-vs-candidates table, the one-line summary.

Every command reports the same way — the baseline and its candidates measured by
:func:`slimkit.pipeline.candidate.measure_candidate`, side by side — so a reader can compare reports of
different techniques column for column.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.core.versions import versions
from slimkit.pipeline.candidate import ROW_HEADER, Candidate
from slimkit.report import Report

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
    r.data = {"task": task.name, "candidates": [c.to_dict() for c in candidates], **data, "versions": versions()}
    r.heading(heading)
    rows = [c.row(base, task.higher_is_better) for c in candidates]
    if compute:
        rows = [row + [c.profile.params_total, c.profile.macs, c.profile.macs / max(base.profile.macs, 1)]
                for row, c in zip(rows, candidates)]
    r.table(ROW_HEADER + (COMPUTE_HEADER if compute else []), rows)
    return r


def summary(baseline: Candidate, candidate: Candidate) -> str:
    """One line for the console: metric against the baseline, size and speed ratios."""
    return (f"{candidate.name} on {candidate.backend}: metric {candidate.metric['score']:.4f} "
            f"(baseline {baseline.metric['score']:.4f}), "
            f"{baseline.profile.artifact_bytes / candidate.profile.artifact_bytes:.2f}x smaller, "
            f"{baseline.latency.p50_ms / candidate.latency.p50_ms:.2f}x faster")
