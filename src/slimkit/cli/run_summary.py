"""``--json``: the numbers of a command's final console line as one JSON object on stdout.

Scripts read stdout; people read the console. With ``--json`` everything the run prints (progress,
tables, the summary line) goes to stderr and stdout carries the one object, built from the same
objects the console line is made of (:func:`slimkit.pipeline.comparison.summary` for the technique
commands, :func:`slimkit.search.result_report.print_summary` for ``optimize``).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import typer

if TYPE_CHECKING:
    from slimkit.pipeline.candidate import Candidate
    from slimkit.pipeline.run import RunResult
    from slimkit.search.result import OptimizeResult

JSON = typer.Option(False, "--json", help="print the summary as one JSON object on stdout (everything else on stderr)")


@contextlib.contextmanager
def console_on_stderr(enabled: bool) -> Iterator[None]:
    """While the command runs with ``--json``, what it prints goes to stderr: stdout keeps the JSON alone."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_json(summary: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()


def _speed(candidate: Candidate, baseline: Candidate) -> dict[str, Any]:
    """The speed part of the console line: the ratio timed beside the original (same runtime too, when it differs)."""
    same = candidate.speedup_same_runtime
    return {"speedup": candidate.speedup.ratio if candidate.speedup and not candidate.emulated else None,
            "speedup_text": candidate.speed_text(baseline),
            "speedup_same_runtime": same.ratio if same and candidate.backend != baseline.backend else None,
            "speed_claimed": candidate.emulated is None}


def technique_summary(command: str, task: str, result: RunResult) -> dict[str, Any]:
    """``quantize`` / ``prune`` / ... : the final candidate against the baseline, and where the files are."""
    baseline, final = result.candidates[0], result.candidates[-1]
    return {"command": command, "task": task, "candidate": final.name, "backend": final.backend,
            "metric": final.metric["score"], "baseline_metric": baseline.metric["score"],
            "size_ratio": baseline.profile.artifact_bytes / final.profile.artifact_bytes,
            "bytes": final.profile.artifact_bytes, "baseline_bytes": baseline.profile.artifact_bytes,
            **_speed(final, baseline),
            "params": final.profile.params_total, "baseline_params": baseline.profile.params_total,
            "out": str(result.out), "model": str(Path(result.out) / "model"),
            "recipe": str(Path(result.out) / "recipe.yaml"), "report": str(result.report)}


def optimize_summary(result: OptimizeResult) -> dict[str, Any]:
    """``optimize``: the best trial against the original, as the console's last lines give them (the best's
    numbers null and ``hints`` filled when nothing fit)."""
    b, best, speed = result.baseline, result.best, result.speed or {}
    m = best.measured if best is not None else None
    out = None if result.out is None else Path(result.out)
    same = speed.get("same_runtime") if speed.get("backend", "torch") != "torch" else None
    return {"command": "optimize", "task": result.task, "trials": len(result.trials),
            "candidate": best.label() if best else None, "trial": best.number if best else None,
            "backend": m.backend if m else None, "metric": m.score if m else None, "baseline_metric": b.score,
            "metric_change": m.score - b.score if m else None, "drop": m.drop if m else None,
            "stopped": result.stopped, "best_source": result.best_source,
            "size_ratio": b.size_mb / m.size_mb if m else None, "size_mb": m.size_mb if m else None,
            "baseline_size_mb": b.size_mb, "latency_ms": m.latency_ms if m else None,
            "baseline_latency_ms": b.latency_ms,
            "speedup": speed["vs_original"]["ratio"] if speed and not speed.get("emulated") else None,
            "speedup_text": speed.get("text"), "speedup_same_runtime": same["ratio"] if same else None,
            "speed_claimed": bool(speed) and not speed.get("emulated"),
            "latency_confirmed": speed.get("latency_confirmed"),
            "params": m.params if m else None, "baseline_params": b.params, "hints": [] if best else list(result.hints),
            "out": None if out is None else str(out), "model": str(out / "best") if out and best else None,
            "recipe": str(out / "recipe.yaml") if out and best else None,
            "report": None if out is None else str(out / "report.html")}


__all__ = ["JSON", "console_on_stderr", "optimize_summary", "print_json", "technique_summary"]
