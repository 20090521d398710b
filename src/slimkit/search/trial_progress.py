"""A progress bar over trials, with one line per finished trial: what was tried and how it measured."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class TrialProgress:
    """``with TrialProgress(total, done) as bar: ... bar.update(frozen_trial)`` (rich; silent when disabled)."""

    def __init__(self, total: int, done: int = 0, *, enabled: bool = True, baseline_score: float | None = None) -> None:
        self.total, self.done, self.enabled = total, done, enabled
        self.baseline_score = baseline_score
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> "TrialProgress":
        if self.enabled:

            self._progress = Progress(TextColumn("[bold]search[/]"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.description}"))
            self._progress.start()
            self._task = self._progress.add_task("", total=self.total, completed=self.done)
        return self

    def update(self, frozen: Any, saved: bool = False) -> None:
        """One finished trial; ``saved``: it is the best so far and was saved as the incumbent."""
        self.done += 1
        if self._progress is None:
            return
        self._progress.update(self._task, completed=min(self.done, self.total))
        self._progress.console.print(trial_line(frozen, self.baseline_score) + (" [bold green]best so far, saved[/]" if saved else ""))

    def say(self, line: str) -> None:
        """A line under the bar (why the search stopped, what the end does): printed on a terminal and in a log."""
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


def trial_line(frozen: Any, baseline_score: float | None = None) -> str:
    """``#4 Channels + Finetune + Int8: 0.061 MB, 0.42 ms, metric change -0.0030 fits`` (rich markup); the
    signed change as the summary and the report print it (the target's ``drop`` when no baseline is given)."""
    recipe = frozen.user_attrs.get("recipe", [])
    m = frozen.user_attrs.get("measured", {})
    pipeline = " + ".join(step["type"].split(".")[-1] for step in recipe) or "original"
    if m.get("error"):
        return f"#{frozen.number} {pipeline}: [red]refused[/] ({m['error']})"
    parts = []
    if m.get("size_mb") is not None:
        parts.append(f"{m['size_mb']:.4g} MB")
    if m.get("latency_ms") is not None:
        parts.append(f"{m['latency_ms']:.3g} ms")
    if m.get("score") is not None and baseline_score is not None:
        parts.append(f"metric change {m['score'] - baseline_score:+.4f}")
    elif m.get("drop") is not None:
        parts.append(f"drop {m['drop']:+.4f}")
    if m.get("stopped_at"):
        parts.append(f"over the {m['stopped_at']} limit, metric skipped")
    check = m.get("latency_check")
    if check and not check.get("met"):
        parts.append(f"{check['candidate_ms']:.3g} ms beside the original, over its {check['limit_ms']:.3g} ms limit")
    fits = all(c <= 0 for c in frozen.user_attrs.get("constraints", [1e9]))
    verdict = "[green]fits[/]" if fits else "[yellow]misses[/]"
    return f"#{frozen.number} {pipeline}: {', '.join(parts)} {verdict}"
