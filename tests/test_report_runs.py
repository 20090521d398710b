"""Technique commands on digits, end to end: the report agrees with the console line on the metric change
and its sign, names the kernels of the runtime the model ran on, shows pruned widths, and ends with the
commands to load, export and replay the result."""

from __future__ import annotations

import html
import json
import re

import pytest
from typer.testing import CliRunner

from slimkit.cli.app import app

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
