"""The progress display shared by every long piece of work: one place that decides how it looks.

On a terminal it is a transient rich bar. Where no terminal shows one (a log file, CI, a pipe) a
bar would print nothing until the end, so the same calls print one line when a stage starts and one
when it ends, with its count and seconds: long work is never silent.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


T = TypeVar("T")

#: Set by a command for everything it runs (on) and by work that must stay quiet (off); ``None``
#: leaves each call's own ``enabled`` flag in charge (library use).
_SHOWN: contextvars.ContextVar[bool | None] = contextvars.ContextVar("slimkit_progress_shown", default=None)
#: A rich live display is on screen: a bar started inside it prints stage lines above it instead.
_LIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("slimkit_progress_live", default=False)


@contextlib.contextmanager
def progress_shown(shown: bool) -> Iterator[None]:
    """Every progress display inside shows (``True``, a command's work) or stays quiet (``False``)."""
    token = _SHOWN.set(shown)
    try:
        yield
    finally:
        _SHOWN.reset(token)


class StageLines:
    """The bar's interface (``add_task``, ``update``, ``advance``) as a start line and an end line per stage."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.stages: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        stage = len(self.stages)
        self.stages[stage] = {"description": description, "total": total, "done": float(fields.get("completed") or 0),
                              "start": time.monotonic(),
                              "info": fields.get("info", "")}
        self._print(f"{description}: started" + (f" ({total:g} steps)" if total else ""))
        return stage

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields: Any) -> None:
        stage = self.stages[task_id]
        if advance is not None:
            stage["done"] += advance
        if completed is not None:
            stage["done"] = completed
        if total is not None:
            stage["total"] = total
        if description is not None:
            stage["description"] = description
        stage["info"] = fields.get("info", stage["info"])
        if stage["total"] and stage["done"] >= stage["total"]:
            self._end(stage)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def finish(self) -> None:
        for stage in self.stages.values():
            self._end(stage)

    def _end(self, stage: dict[str, Any]) -> None:
        if stage.get("ended"):
            return
        stage["ended"] = True
        count = f"{stage['done']:g}/{stage['total']:g} " if stage["total"] else ""
        info = f", {stage['info']}" if stage["info"] else ""
        self._print(f"{stage['description']}: done {count}in {time.monotonic() - stage['start']:.1f} s{info}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


class progress_bar:
    """A transient rich progress bar on a terminal, :class:`StageLines` elsewhere, or ``None`` when disabled
    (tests, work nested inside a search trial).

    The bar shows an ``info`` field (e.g. the current loss) after the counts; callers that do not
    set it get an empty column.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self):  # noqa: ANN204
        shown = _SHOWN.get()
        if not (self.enabled if shown is None else shown):
            return None
        if _LIVE.get() or not Console(stderr=True).is_terminal:
            self.bar = StageLines()
            return self.bar
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
        self.bar.__enter__()
        self._live = _LIVE.set(True)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.bar, StageLines):
            self.bar.finish()
        elif self.bar is not None:
            _LIVE.reset(self._live)
            self.bar.__exit__(*exc)


def each(items: Iterable[T], description: str, *, total: int | None = None, enabled: bool = False) -> Iterator[T]:
    """``items`` one by one, counted on a progress display (shown when a command asks for progress,
    or ``enabled``): the loops over layers and calibration batches that take seconds to minutes."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(enabled) as bar:
        task = bar.add_task(description, total=total, info="") if bar is not None else None
        for item in items:
            yield item
            if bar is not None:
                bar.advance(task)
