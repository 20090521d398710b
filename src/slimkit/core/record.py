"""What a technique did to a model, as typed records the report, the search and the artifact read.

Each handler adds one :class:`StepRecord` (a family's subclass: which layers changed, which were
left intact and why, sizes before and after). Records travel with the model through later steps
and deep copies, so the final model of a pipeline knows every step that made it; ``slimkit.save``
writes them into the artifact's JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence, TypeVar

import torch.nn as nn

from slimkit.core.task import Task

R = TypeVar("R", bound="StepRecord")
_ATTR = "slimkit_records"


@dataclasses.dataclass
class StepRecord:
    """One applied technique: its recipe type and config, and the layers it left intact (with why)."""

    technique: str
    config: dict[str, Any]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"record": type(self).__name__, **dataclasses.asdict(self)}


@dataclasses.dataclass
class StepView:
    """What a report section may look at beside the record: the model before and after the step, the task."""

    before: nn.Module | None = None
    after: nn.Module | None = None
    task: Task | None = None


class ReportSection(Protocol):
    """The part of a report a technique writes into (``slimkit.report.Report`` implements it);
    ``data`` is the report's JSON twin, for numbers a program should read back."""

    data: dict[str, Any]

    def heading(self, text: str) -> None: ...
    def note(self, text: str) -> None: ...
    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None: ...
    def bar_plot(self, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], xlabel: str) -> None: ...
    def histogram(self, title: str, series: dict[str, Sequence[float]], xlabel: str, bins: int = 80) -> None: ...
    def image(self, path: str, title: str) -> None: ...


def add_record(model: nn.Module, record: StepRecord) -> None:
    """Append ``record`` to the model's history of applied techniques."""
    set_records(model, records_of(model) + [record])  # a plain attribute, not a submodule or buffer


def set_records(model: nn.Module, records: list[StepRecord]) -> None:
    object.__setattr__(model, _ATTR, list(records))


def records_of(model: nn.Module) -> list[StepRecord]:
    """Every step applied to ``model``, oldest first."""
    return list(getattr(model, _ATTR, []))


def last_record(model: nn.Module, kind: type[R] = StepRecord) -> R | None:  # type: ignore[assignment]
    """The newest record of ``kind`` (e.g. the last quantization step; default: any), or None."""
    for record in reversed(records_of(model)):
        if isinstance(record, kind):
            return record
    return None


def replace_last(model: nn.Module, record: StepRecord) -> None:
    """Swap the newest record of the same kind for ``record`` (a step that refines its own result)."""
    history = records_of(model)
    for i in range(len(history) - 1, -1, -1):
        if type(history[i]) is type(record):
            history[i] = record
            set_records(model, history)
            return
    add_record(model, record)


def skipped_layers(model: nn.Module) -> dict[str, str]:
    """Every layer some step left intact, with the reason (later steps' reasons win)."""
    out: dict[str, str] = {}
    for record in records_of(model):
        out.update(record.skipped)
    return out
