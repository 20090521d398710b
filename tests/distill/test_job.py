"""``slimkit distill`` on digits: a factorized artifact as the student, distilled vs fine-tuned, reloadable."""

import json

import pytest
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli.app import app
from slimkit.factorize import Tucker

runner = CliRunner()


@pytest.mark.slow
def test_distill_an_artifact_student_with_the_plain_control(tmp_path, one_thread, digits_task):
    student = sk.apply(digits_task.model, Tucker(ratio=0.3), digits_task)
    sk.save(student, tmp_path / "student")
    result = runner.invoke(app, ["distill", "--task", "digits", "--student", str(tmp_path / "student"),
                                 "--steps", "60", "--lr", "3e-3", "--temperature", "1", "--alpha", "0.9",
                                 "--features", "6", "--threads", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    names = [c["name"] for c in report["candidates"]]
    assert names == ["baseline", "after distill.StudentArtifact", "fine-tuned 60 steps", "distilled 60 steps"]
    teacher, before, plain, distilled = report["candidates"]
    assert distilled["metric"]["score"] > before["metric"]["score"] + 0.2
    assert distilled["profile"]["params_total"] == before["profile"]["params_total"] < teacher["profile"]["params_total"]
    assert report["recipe"]["steps"][-1]["features"] == [["6", "6"]]
    assert report["recipe"]["steps"][0]["type"] == "distill.StudentArtifact"  # the saved student, by its digest
    loaded = sk.load(tmp_path / "run" / "model")
    assert digits_task.evaluate(loaded)["score"] == distilled["metric"]["score"]


@pytest.mark.parametrize("args, fragment", [
    (["--student", "nowhere"], "is not 'self', 'layers:N' or an artifact directory"),
    (["--student", "layers:x"], "N is not a number"),
    (["--alpha", "2"], "--alpha 2 is out of range"),
])
def test_bad_options_are_one_line_errors(tmp_path, args, fragment):
    result = runner.invoke(app, ["distill", "--task", "digits", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.output
