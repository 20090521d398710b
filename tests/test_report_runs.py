"""The report agrees with the console line on the metric change and its sign (measured candidates, and the
technique commands on digits end to end), names the kernels of the runtime the model ran on, shows pruned
widths, and ends with the commands to load, export and replay the result."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from slimkit.cli.app import app
from slimkit.core.task import Task
from slimkit.measure import profile
from slimkit.pipeline.candidate import Candidate
from slimkit.pipeline.comparison import comparison_report, summary

runner = CliRunner()

#: command line, what the report must show (run directory as {out}), the sign the metric change must have
CASES = {
    "channels without fine-tuning (metric goes down)": (
        ["prune", "--method", "channels", "--macs-ratio", "0.25"],
        ["Output width per layer", "<td>0 (Conv2d)</td>", "alt='output channels per layer'"], "-"),
    "static int8 on ONNX Runtime": (
        ["quantize", "--config", "int8-static"],
        ["<th>kernel on onnxruntime</th>", "<td>QLinearConv</td>", "<td>QGemm</td>",
         "slimkit export {out} --format onnx --out model.onnx"], None),
}


@pytest.mark.slow
@pytest.mark.parametrize("args, shown, sign", CASES.values(), ids=CASES.keys())
def test_report_agrees_with_the_console_and_says_what_next(tmp_path, one_thread, args, shown, sign):
    out = tmp_path / "run"
    result = runner.invoke(app, [*args, "--task", "digits", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    console = " ".join(result.output.split())
    said = re.search(r"metric ([\d.]+) \(baseline ([\d.]+), metric change ([+-]\d\.\d{4})\)", console)
    assert said, console[-600:]
    page = html.unescape((out / "report.html").read_text())
    data = json.loads((out / "report.json").read_text())
    base, final = data["candidates"][0]["metric"]["score"], data["candidates"][-1]["metric"]["score"]
    assert said.group(3) == f"{final - base:+.4f}" and (sign is None or said.group(3)[0] == sign)
    row = re.search(r"<tr><td>[^<]+</td><td>\w+</td><td>[\d.]+</td><td>([+-][\d.]+)</td>", page.split("</tr>", 2)[-1])
    assert row and row.group(1) == said.group(3)  # the final candidate's row: same number, same sign
    assert "<th>metric change</th>" in page and "quality delta" not in page
    assert "Higher top-1 accuracy is better, so a negative change is a loss" in page
    for text in shown + ['slimkit.load("{out}/model")', "slimkit apply {out}/recipe.yaml --task digits"]:
        assert text.format(out=out) in page


@pytest.fixture(scope="module")
def measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return model, profile(model, torch.randn(2, 8), threads=1, min_time_s=0.01, breakdown_runs=1)


@pytest.mark.parametrize("metric, higher_is_better, baseline, score, change", [
    ("top-1 accuracy", True, 0.9530, 0.9500, "-0.0030"),
    ("top-1 accuracy", True, 0.9500, 0.9530, "+0.0030"),
    ("perplexity", False, 12.0, 12.5, "+0.5000"),
])
def test_console_line_and_report_table_give_one_signed_change(measured, metric, higher_is_better, baseline, score,
                                                              change):
    model, prof = measured
    task = Task(name="toy", model=model, example=(torch.randn(2, 8),), metric=None, eval=None,
                higher_is_better=higher_is_better, metric_name=metric)
    base, final = (Candidate(name, [], "torch", metric={"score": s}, profile=prof, latency=prof.latency, model=model)
                   for name, s in (("baseline", baseline), ("final", score)))
    line = summary(base, final)
    assert f"metric {score:.4f} (baseline {baseline:.4f}, metric change {change})" in line
    page = html.unescape(comparison_report("t", "h", task, [base, final]).html())
    assert re.search(rf"<td>final</td><td>torch</td><td>[\d.]+</td><td>{re.escape(change)}</td>", page)
    loss = "negative" if higher_is_better else "positive"
    assert f"{'Higher' if higher_is_better else 'Lower'} {metric} is better, so a {loss} change is a loss" in page
