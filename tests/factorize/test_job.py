"""``slimkit factorize`` end to end on digits: report numbers, reloadable artifact, one-line errors."""

import json

import pytest
from typer.testing import CliRunner

from slimkit import io
from slimkit.cli.app import app

runner = CliRunner()


@pytest.mark.slow
def test_factorize_svd_with_distillation_reports_and_reloads(tmp_path, one_thread, digits_task):
    result = runner.invoke(app, ["factorize", "--task", "digits", "--method", "svd", "--targets", "all-linear",
                                 "--ratio", "0.3", "--finetune-steps", "100", "--distill", "--threads", "1",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    base, factorized, recovered = report["candidates"]
    info, recovery = report["steps"]
    assert info["record"] == "FactorizeRecord" and recovery["record"] == "TrainRecord"
    assert set(info["layers"]) == {"12"} and "output layer" in info["skipped"]["14"]
    r = info["layers"]["12"]["rank"]
    assert r == int(0.3 * 64 * 256 / (64 + 256))
    assert info["layers"]["12"]["params_after"] == r * (64 + 256) + 64
    assert info["params"] == [base["profile"]["params_total"], recovered["profile"]["params_total"]]
    assert report["reload_max_abs_diff"] == 0.0
    assert recovered["metric"]["score"] >= base["metric"]["score"] - 0.02
    assert recovered["metric"]["score"] >= factorized["metric"]["score"]
    assert recovery["technique"] == "distill.Distill" and recovery["steps"] == 100
    loaded = io.load(tmp_path / "model")
    assert digits_task.evaluate(loaded)["score"] == recovered["metric"]["score"]
    assert "factorize.SVD: factorized layers" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["--ratio", "0"], "--ratio 0 is out of range"),
    (["--ratio", "1.5"], "--ratio 1.5 is out of range"),
    (["--method", "qr"], "unknown factorization method 'qr'"),
    (["--method", "svd", "--exclude", "nope"], "exclude names unknown module(s) nope"),
    (["--method", "cp", "--energy", "0.9"], "use --method svd"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, fragment):
    result = runner.invoke(app, ["factorize", "--task", "digits", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.output
