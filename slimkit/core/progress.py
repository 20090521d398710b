"""The rich progress bar shared by ``fit`` and ``finetune``: one place that decides how it looks."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class progress_bar:
    """A transient rich progress bar, or ``None`` when disabled (tests, non-interactive runs).

    The bar shows an ``info`` field (e.g. the current loss) after the counts; callers that do not
    set it get an empty column.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self):  # noqa: ANN204
        if not self.enabled:
            return None

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True)
        self.bar.__enter__()
        return self.bar

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
