"""The HTML report reads right: tick labels apart (matplotlib's own text extents), histograms as outlines,
layer names with their types, the runtime's kernels, the pruned widths, one signed metric change, next steps."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn as nn

from slimkit import io
from slimkit.core.task import Task
from slimkit.measure import layer_breakdown
from slimkit.prune.channels import Channels
from slimkit.prune.magnitude import Magnitude
from slimkit.report import Report
from slimkit.report.html import histogram_figure, pyplot_or_none
from slimkit.report.metric_change import METRIC_CHANGE, change_text, sign_note
from slimkit.report.readable_axes import overlapping_tick_labels, shown_tick_labels

plt = pyplot_or_none()
pytestmark = pytest.mark.skipif(plt is None, reason="matplotlib (the report extra) is not installed")


def _pareto_like():
    """The search's Pareto panels: a log artifact-MB axis spanning less than a decade (minor ticks labelled)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax in axes:
        ax.scatter([0.012, 0.03, 0.05, 0.09, 0.1664], [0.90, 0.95, 0.97, 0.99, 0.997])
        ax.set_xscale("log")
        ax.set_xlabel("artifact MB")
    return fig


def _log_latency():
    """A latency axis from 2 to 30 ms on a narrow panel: a bit over a decade, minor ticks still labelled."""
    fig, ax = plt.subplots(figsize=(3, 2.5))
    ax.plot([2.0, 7.5, 30.0], [0.9, 0.95, 0.99])
    ax.set_xscale("log")
    return fig


def _many_layer_names():
    fig, ax = plt.subplots(figsize=(6, 3))
    names = [f"features.{i}.block.conv (Conv2d)" for i in range(40)]
    ax.barh(range(40), range(40))
    ax.set_yticks(range(40), labels=names, fontsize=8)
    return fig


def _long_numbers():
    fig, ax = plt.subplots(figsize=(2.5, 2.5))
    ax.plot([1_234_567.0, 9_876_543.0], [0.000012345, 0.000098765])
    ax.ticklabel_format(useOffset=False, style="plain")
    return fig


FIGURES = {"log axis under a decade": _pareto_like, "log latency axis, narrow": _log_latency,
           "forty layer names": _many_layer_names, "long numbers on a narrow axis": _long_numbers}


@pytest.mark.parametrize("build", FIGURES.values(), ids=FIGURES.keys())
def test_report_figures_have_no_overlapping_tick_labels(build):
    fig = build()
    fig.tight_layout()
    assert overlapping_tick_labels(fig)  # the case is a real one: matplotlib's defaults collide
    Report("t").figure(fig, "t")  # every figure of a report goes through the same path
    assert overlapping_tick_labels(fig) == []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            assert len(shown_tick_labels(axis)) >= 2, "an axis kept fewer than two labels in view"


def test_histograms_are_outlines_on_shared_bins():
    gen = torch.Generator().manual_seed(0)
    series = {f"layer {k}": (torch.randn(2000, generator=gen) * (k + 1) * 1e-3).tolist() for k in range(4)}
    fig = histogram_figure(plt, "error", series, "quantized - float output", bins=40)
    ax = fig.axes[0]
    assert len(ax.patches) == 4 and not any(p.get_fill() for p in ax.patches)
    spans = {(round(p.get_path().vertices[:, 0].min(), 9), round(p.get_path().vertices[:, 0].max(), 9))
             for p in ax.patches}
    assert len(spans) == 1  # the same 40 bins for every layer
    plt.close(fig)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def test_layer_names_carry_their_types_unless_a_column_says_it():
    model = _mlp()
    r = Report("t")
    r.describe_run(model, model)
    r.table(["layer", "reason"], [["0", "kept float"], ["(model)", "-"]])
    r.table(["layer", "type", "SQNR dB"], [["2", "Linear", 40.0]])
    page = r.html()
    assert "<td>0 (Linear)</td>" in page and "<td>(model)</td>" in page
    assert "<td>2</td><td>Linear</td>" in page


@pytest.mark.parametrize("runtime, kernels, header, cell", [
    ("onnxruntime", {"0": "QGemm", "2": "MatMulInteger"}, "kernel on onnxruntime", "MatMulInteger"),
    ("onnxruntime", {"0": "QGemm"}, "kernel on onnxruntime", "float (kept out of the integer graph)"),
    ("torch", None, "kernel", "aten._weight_int4pack_mm_for_cpu"),
])
def test_kernel_column_names_the_runtime_that_ran(runtime, kernels, header, cell):
    model = _mlp()
    r = Report("t")
    r.describe_run(model, model, runtime, kernels)
    r.table(["layer", "type", "kernel"], [["2", "Linear", "aten._weight_int4pack_mm_for_cpu"]])
    assert f"<th>{header}</th>" in r.html() and f"<td>{cell}</td>" in r.html()


@pytest.mark.parametrize("step, width_after, min_sparsity", [
    pytest.param(Channels(amount=0.5, round_to=None), 16, 0.0, marks=pytest.mark.slow),  # tracing takes seconds
    (Magnitude(amount=0.6), 32, 0.3),
])
def test_pruning_adds_widths_and_sparsity_unless_a_step_showed_them(step, width_after, min_sparsity):
    before = _mlp()
    task = Task(name="toy", model=_mlp(), example=(torch.randn(4, 16),), metric=None, eval=None)
    after = step.apply_to(task.model, task)
    r = Report("t")
    r.describe_run(before, after)
    page = r.html()
    assert "Pruned widths and sparsity per layer" in page and "alt='pruned widths and sparsity'" in page
    row = re.search(r"<td>2</td><td>Linear</td><td>32</td><td>(\d+)</td><td>[^<]*</td><td>([^<]*)</td>", page)
    assert row and int(row.group(1)) == width_after and float(row.group(2)) >= min_sparsity
    r.heading("Output width per layer")  # a pruning step's own section: not shown twice
    assert "Pruned widths and sparsity" not in r.html()


def test_a_narrower_model_without_records_shows_its_widths():
    """A model whose step records were lost on the way (rebuilt elsewhere) still shows what was cut."""
    narrow = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    r = Report("t")
    r.describe_run(_mlp(), narrow)
    assert "<td>0</td><td>Linear</td><td>32</td><td>8</td><td>0.25</td>" in r.html()


def test_quantization_alone_shows_no_pruning_view():
    before = _mlp()
    after = _mlp()
    with torch.no_grad():
        after[0].weight[:, :4] = 0  # zeros a 4-bit rounding could leave, with no pruning step recorded
    r = Report("t")
    r.describe_run(before, after)
    assert "Pruned widths" not in r.html()


@pytest.mark.parametrize("higher_is_better, score, baseline", [(True, 0.950, 0.953), (True, 0.96, 0.95),
                                                               (False, 12.5, 12.0)])
def test_metric_change_is_signed_the_same_in_table_and_note(higher_is_better, score, baseline):
    r = Report("t")
    r.table(["candidate", METRIC_CHANGE], [["best", score - baseline]])
    r.note(sign_note("the metric", higher_is_better))
    page = r.html()
    assert f"<td>{change_text(score - baseline)}</td>" in page
    assert change_text(score - baseline)[0] == ("-" if score < baseline else "+")
    loss = "a negative change is a loss" if higher_is_better else "a positive change is a loss"
    assert loss in page


@pytest.mark.parametrize("files, task, expect, absent", [
    (("model", "recipe.yaml", "model.onnx"), "digits",
     ['slimkit.load("{out}/model")', "slimkit export {out} --format onnx --out model.onnx",
      "slimkit apply {out}/recipe.yaml --task digits --out {out}-replay"], ["slimkit report"]),
    (("best", "recipe.yaml", "result.json", "best.onnx"), "mnist",
     ['slimkit.load("{out}/best")', "slimkit export {out} --format onnx", "slimkit report {out}"], []),
    (("model", "recipe.yaml"), "digits",
     ["slimkit export {out} --format onnx --out model.onnx --task digits"], []),
    (("model", "recipe.yaml"), "digits",
     ["served it on torch (weight-only int4 runs on torch)",
      "slimkit export {out} --format onnx --out model.onnx --task digits"], []),
])
def test_next_steps_give_the_commands_for_what_the_run_wrote(tmp_path, files, task, expect, absent):
    out = tmp_path / "run"
    out.mkdir()
    for name in files:
        if name in ("model", "best"):
            io.save(_mlp(), out / name)
        else:
            (out / name).write_text("x")
    data = {"task": task}
    if "torch" in expect[0]:  # what a technique command records when the result runs on torch only
        data["onnx"] = "none: weight-only int4 runs on torch"
    r = Report("t", data=data)
    page = r.write(out).read_text()
    text = page.replace("&quot;", '"').replace("&#x27;", "'")
    assert "<h2 id='next-steps'>Next steps</h2>" in page and "href='#next-steps'" in page
    for command in expect:
        assert command.format(out=out) in text
    for command in absent:
        assert command not in text
    assert json.loads((out / "report.json").read_text()) == data


def test_layer_profile_comes_after_the_steps_with_every_row():
    rows = layer_breakdown(_mlp(), torch.randn(4, 16), runs=2)
    r = Report("t")
    r.layer_profile("final", rows, top=3)
    r.heading("a step's own section")
    page = r.html()
    assert page.index("a step&#x27;s own section") < page.index("Where the time goes: final, per layer")
    shown = re.findall(r"<tr><td>([^<]+)</td><td>(\w+|-)</td>", page)
    assert shown == [(row.name, row.kind) for row in sorted(rows, key=lambda row: -row.time_share)[:3]]
    assert "alt='share of the time per layer'" in page


def test_no_next_steps_without_a_run_directory(tmp_path):
    page = Report("t").write(tmp_path).read_text()
    assert "Next steps" not in page
