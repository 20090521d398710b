"""The demo job: profile the default task's model, try precision casts, measure all, write a report.

Later stages (search over pipelines) plug into the same report; for now the demo shows the
measuring half of slimkit end to end on real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit import io, zoo
from slimkit.candidate import ROW_HEADER, Candidate, measure_candidate
from slimkit.config import apply
from slimkit.quantize import BFloat16, Float16
from slimkit.report import Report


def run(task_name: str = "mnist", out: str | Path = "runs/demo", threads: int | None = None,
        progress: bool = True) -> Path:
    """Run the demo and return the path of its HTML report."""
    from rich.console import Console

    console = Console()
    out = Path(out)
    task = zoo.load(task_name, progress=progress) if task_name in zoo.BUILTINS else zoo.load(task_name)
    console.print(f"[bold]task[/] {task.name}: {task.description}")
    candidates = [measure_candidate("baseline (fp32)", task.model, [], task, threads=threads)]
    for config in (Float16(), BFloat16()):
        model = apply(task.model, config, task)
        candidates.append(measure_candidate(type(config).__name__.lower(), model, [config], task, threads=threads))
    console.print(candidates[0].profile.render())
    io.save(task.model, out / "model", extra={"task": task.name, "metric": candidates[0].metric})
    report = _report(task, candidates)
    path = report.write(out)
    console.print(f"[green]report[/] {path}")
    return path


def _report(task: Any, candidates: list[Candidate]) -> Report:
    base = candidates[0]
    r = Report(title=f"slimkit report — {task.name}")
    r.data = {"task": {"name": task.name, "metric": task.metric_name, "splits": dict(task.splits),
                       "higher_is_better": task.higher_is_better},
              "candidates": [c.to_dict() for c in candidates],
              "versions": io.versions()}
    r.heading("Candidates (measured)")
    r.table(ROW_HEADER, [c.row(base, task.higher_is_better) for c in candidates])
    r.note("Size is the bytes of the saved safetensors artifact; latency is measured on the CPU with "
           f"{base.profile.threads} thread(s); quality is the task metric on held-out data.")
    r.heading("Where the cost is (baseline, per layer)")
    layers = base.profile.layers[:20]
    r.bar_plot("share per layer", [row.name for row in layers],
               {"MACs": [row.macs_share for row in layers], "params": [row.params_share for row in layers],
                "time": [row.time_share for row in layers]}, "share of model total")
    r.table(["layer", "type", "MACs", "params", "time ms", "MACs %", "params %", "time %"],
            [[row.name, row.kind, row.macs, row.params, row.time_ms, 100 * row.macs_share,
              100 * row.params_share, 100 * row.time_share] for row in layers])
    r.note(f"Energy is an estimate: {base.profile.energy_note}")
    return r
