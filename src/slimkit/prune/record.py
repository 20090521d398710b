"""What a pruning step did: per-layer sparsity or widths, MACs and parameters, and its report section."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit.core.config import BaseConfig
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.prune.plots import sparsity_heatmap, sparsity_trend
from slimkit.train.masks import global_sparsity, layer_sparsity


@dataclasses.dataclass
class SparsityRecord(StepRecord):
    """Unstructured / N:M pruning: zeros per layer, overall, and (gradual schedules) sparsity over steps."""

    layers: dict[str, float] = dataclasses.field(default_factory=dict)
    sparsity: float = 0.0
    history: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    #: Per-layer sparsity after each pruning step of a schedule: [(step, {layer: sparsity}), ...].
    snapshots: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ChannelRecord(StepRecord):
    """Structured pruning: widths before/after per layer, heads removed, MACs and params, refits."""

    amount: float = 0.0
    macs: list[int] = dataclasses.field(default_factory=list)           # [before, after]
    params: list[int] = dataclasses.field(default_factory=list)         # [before, after]
    layers: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # layer -> [width before, after]
    heads: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    groups_pruned: int = 0
    reconstruction: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    latency_table: dict[str, Any] | None = None


def record_sparsity(model: nn.Module, config: BaseConfig, names: list[str], skipped: dict[str, str],
                    history: list[tuple[int, float]] | None = None,
                    snapshots: list[tuple[int, dict[str, float]]] | None = None) -> SparsityRecord:
    """Add what was pruned to the model's records (and return it)."""
    record = SparsityRecord(config.type_name, config.to_dict(), dict(skipped), layers=layer_sparsity(model, names),
                            sparsity=global_sparsity(model, names), history=list(history or []),
                            snapshots=list(snapshots or []))
    add_record(model, record)
    return record


def prune_report_section(report: ReportSection, record: StepRecord, view: StepView) -> None:
    """Widths per layer (structured) or sparsity per layer (unstructured), and the layers left intact."""
    if record.skipped:
        report.heading(f"{record.technique}: layers left intact")
        report.table(["layer", "reason"], [[n, why] for n, why in record.skipped.items()])
    if isinstance(record, ChannelRecord):
        report.heading("Output width per layer")
        report.table(["layer", "before", "after", "kept"], [[n, b, a, a / b] for n, (b, a) in record.layers.items()])
        if record.layers:
            report.bar_plot("output channels per layer", list(record.layers),
                            {"before": [b for b, _ in record.layers.values()],
                             "after": [a for _, a in record.layers.values()]}, "channels / neurons")
        if record.heads:
            report.table(["attention", "heads removed"], [[n, str(v)] for n, v in record.heads.items()])
    elif isinstance(record, SparsityRecord):
        report.heading(f"Sparsity per layer (overall {record.sparsity:.3f})")
        report.table(["layer", "sparsity"], list(record.layers.items()))
        with tempfile.TemporaryDirectory() as tmp:
            if record.layers:
                report.image(str(sparsity_heatmap(heatmap_rows(record, view), Path(tmp) / "heatmap.png")),
                             "sparsity per layer")
            if record.history:
                target = record.config.get("amount")
                report.image(str(sparsity_trend(record.history, Path(tmp) / "trend.png", target=target)),
                             "sparsity over the schedule")


def heatmap_rows(record: SparsityRecord, view: StepView) -> Any:
    """The heatmap's rows (snapshots over a schedule, else the final sparsity per layer), each layer named
    with its type as the report's tables and the search report's heatmap name it: ``'3 (Conv2d)'``. A picture
    cannot be relabelled after it is drawn, so the names are typed before drawing."""
    from slimkit.report.pruned_view import layer_types  # the report package loads when a report is written

    types = layer_types(view.before, view.after)  # the original's type first (a layer a later step swapped)

    def typed(layers: dict[str, float]) -> dict[str, float]:
        return {f"{n} ({types[n]})" if n in types else n: s for n, s in layers.items()}

    if record.snapshots:
        return [(step, typed(layers)) for step, layers in record.snapshots]
    return typed(record.layers)


@dataclasses.dataclass(frozen=True)
class PruneConfig(BaseConfig):
    """What every pruning config shares: its report section (widths or sparsity, layers left intact)."""

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        prune_report_section(report, record, view)

