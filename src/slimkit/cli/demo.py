"""The demo job (`make demo`): profile the default task's model, then search for the best model under a
default target and print the summary and the report path.

The default target is the one a deployment usually starts from: at most a tenth of the original
bytes, at most one point of accuracy lost, and no slower than the original on this CPU. The
budget (trials and seconds) keeps it to a few minutes on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from slimkit import zoo
from slimkit.cli.task_options import DEFAULT_TASK
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.measure import profile
from slimkit.search.optimize import optimize
from slimkit.search.result_report import print_summary

#: Limits relative to the original model: bytes share, metric drop, latency share.
DEFAULT_SIZE_SHARE = 0.10
DEFAULT_MAX_DROP = 0.01
DEFAULT_LATENCY_SHARE = 1.0
DEFAULT_TRIALS = 12
DEFAULT_TIME_BUDGET_S = 240.0


def default_target(task: Task, threads: int | None = None) -> tuple[Any, Any]:
    """The demo's target and the profile it comes from (``task.model``'s bytes); the latency limit is relative
    to the original, which the search times itself and the end of the run re-times beside the best."""

    p = profile(task.model, task.example, threads=threads)
    return Target(max_size_mb=p.artifact_bytes / 1e6 * DEFAULT_SIZE_SHARE, max_drop=DEFAULT_MAX_DROP,
                  max_latency_vs_original=DEFAULT_LATENCY_SHARE, threads=threads), p


def run(task_name: str = DEFAULT_TASK, out: str | Path = "runs/demo", threads: int | None = None,
        progress: bool = True, trials: int = DEFAULT_TRIALS, time_budget: float = DEFAULT_TIME_BUDGET_S) -> Path:
    """Run the demo and return the path of its HTML report."""


    console = Console()
    out = Path(out)
    task = zoo.load(task_name, progress=progress) if task_name in zoo.BUILTINS else zoo.load(task_name)
    console.print(f"[bold]task[/] {task.name}: {task.description}")
    target, base = default_target(task, threads)
    console.print(base.render())
    console.print(f"[bold]target[/] at most {target.max_size_mb:.4g} MB (10% of the original), a metric drop of "
                  f"at most {target.max_drop:g}, p50 latency at most {target.max_latency_vs_original:g}x the "
                  "original's (timed beside it); "
                  f"{trials} trials or {time_budget:g} s")
    _forget_previous_run(out)
    result = optimize(task, target, trials=trials, time_budget=time_budget, out=out, progress=progress,
                      task_spec=task_name)
    print_summary(result)
    return out / "report.html"


def _forget_previous_run(out: Path) -> None:
    """Each demo run starts a new search: the previous run's study file is removed, not resumed."""
    (out / "study.db").unlink(missing_ok=True)
