"""A pruning step's own report section names layers with their types, in its sparsity heatmap as in its tables."""

from __future__ import annotations

import pytest

import slimkit as sk
from slimkit import prune
from slimkit.core.record import StepView, last_record
from slimkit.prune.record import SparsityRecord, heatmap_rows, prune_report_section
from slimkit.report import Report
from tests.models import cnn, mlp


@pytest.mark.parametrize("build,config,labels", [
    (mlp, prune.Magnitude(amount=0.5), ["0 (Linear)", "2 (Linear)", "4 (Linear)"]),
    (cnn, prune.Magnitude(amount=0.5, scope="layer"), ["0 (Conv2d)", "4 (Conv2d)", "9 (Linear)", "11 (Linear)"]),
    (mlp, prune.NM(n=2, m=4), ["0 (Linear)", "2 (Linear)"]),
])
def test_heatmap_rows_name_layers_with_their_types(build, config, labels):
    model = build()
    pruned = sk.apply(model, config)
    record = last_record(pruned, SparsityRecord)
    rows = heatmap_rows(record, StepView(model, pruned))
    assert [label for label in labels if label in rows] == labels
    assert all(" (" in label for label in rows)  # every pruned layer is typed
    assert sorted(rows.values()) == sorted(record.layers.values())  # the same numbers, only renamed
    assert record.sparsity == pytest.approx(0.5, abs=0.01)  # half (or 2 of every 4) of the pruned weights are zero


def test_schedule_snapshots_are_typed_step_by_step():
    model = mlp()
    record = SparsityRecord("prune.Gradual", {}, {}, layers={"0": 0.5, "2": 0.5}, sparsity=0.5,
                            snapshots=[(10, {"0": 0.2, "2": 0.1}), (20, {"0": 0.5, "2": 0.5})])
    rows = heatmap_rows(record, StepView(model, model))
    assert rows == [(10, {"0 (Linear)": 0.2, "2 (Linear)": 0.1}), (20, {"0 (Linear)": 0.5, "2 (Linear)": 0.5})]
    assert heatmap_rows(record, StepView()) == record.snapshots  # no models to read types from: names as recorded


def test_report_section_draws_the_heatmap():
    pytest.importorskip("matplotlib")
    model = mlp()
    pruned = sk.apply(model, prune.Magnitude(amount=0.5))
    report = Report("t")
    prune_report_section(report, last_record(pruned, SparsityRecord), StepView(model, pruned))
    assert "alt='sparsity per layer'" in report.html()
