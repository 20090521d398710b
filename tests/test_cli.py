import json

import pytest
import torch.nn as nn
from typer.testing import CliRunner

from slimkit import io, zoo
from slimkit.cli.app import app
from slimkit.core.errors import SlimkitError
from slimkit.pipeline.recipe import Recipe

runner = CliRunner()
MY_TASK = "tests.test_cli:digits_through_a_function"


def digits_through_a_function():  # noqa: ANN201  (a user's own task function, named by MY_TASK)
    return zoo.load("digits")


def test_tasks_lists_every_builtin_with_splits_and_metric():
    result = runner.invoke(app, ["tasks"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, words in {"digits": ["360", "1437"], "mnist": ["4000", "1000"], "minilm": ["353"]}.items():
        line = next(line for line in result.output.splitlines() if f" {name} " in line)
        for w in words:
            assert w in line, (name, w, line)


def test_profile_writes_json_with_real_numbers(tmp_path, digits_task):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", "--task", "digits", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    model = digits_task.model
    assert data["params_total"] == sum(p.numel() for p in model.parameters())
    assert data["artifact_bytes"] == io.artifact_bytes(io.save(model, tmp_path / "a"))
    # Hand count, batch 1, 8x8 input: three 3x3 convs at 8x8, 8x8, 4x4 and two linears.
    macs = 64 * 16 * 1 * 9 + 64 * 32 * 16 * 9 + 16 * 64 * 32 * 9 + 256 * 64 + 64 * 10
    assert data["macs"] == macs
    assert data["latency"]["p50_ms"] <= data["latency"]["p95_ms"]
    assert data["threads"] == 1


@pytest.mark.parametrize("args,message", [
    (["profile", "--task", "cifar"], "unknown task 'cifar'"),
    (["profile", "--task", "nope.mod:fn"], "cannot import 'nope.mod'"),
    (["quantize", "--task", "digits", "--config", "int8-dynamic", "--embedding-bits", "3"], "--embedding-bits 3"),
    (["quantize", "--task", "digits", "--config", "fp16", "--embedding-bits", "4"], "do not apply to fp16"),
])
def test_errors_are_one_line_with_exit_code_2(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and " — " in lines[0]


@pytest.mark.slow
def test_demo_searches_under_the_default_target(tmp_path, digits_task):
    result = runner.invoke(app, ["demo", "--task", "digits", "--out", str(tmp_path), "--threads", "1",
                                 "--trials", "3", "--time-budget", "40"])
    assert result.exit_code == 0, result.output
    assert "report" in result.output and "original" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    search = report["search"]
    base_mb = search["baseline"]["size_mb"]
    target = search["target"]
    assert target["max_size_mb"] == pytest.approx(base_mb * 0.10, rel=0.01) and target["max_drop"] == 0.01
    assert 1 <= len(search["trials"]) <= 3
    if search["best"] is not None:                       # what it returns fits
        best = search["best"]["measured"]
        assert best["size_mb"] <= target["max_size_mb"] and best["drop"] <= 0.01
        assert best["latency_ms"] <= target["max_latency_ms"]
        assert io.load(tmp_path / "best") is not None
    else:                                                # or it says why nothing did
        assert search["hints"] and search["closest"]
    # a second demo run starts afresh instead of refusing the existing study
    again = runner.invoke(app, ["demo", "--task", "digits", "--out", str(tmp_path), "--threads", "1",
                                "--trials", "1", "--time-budget", "30"])
    assert again.exit_code == 0, again.output
    assert len(json.loads((tmp_path / "report.json").read_text())["search"]["trials"]) == 1


def test_quantize_command_runs_int8_on_onnxruntime_and_reports_layers(tmp_path, digits_task):
    result = runner.invoke(app, ["quantize", "--task", "digits", "--config", "int8-static", "--threads", "1",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    base, q = report["candidates"]
    assert q["backend"] == "onnxruntime"
    assert abs(q["metric"]["score"] - base["metric"]["score"]) <= 0.01
    assert base["profile"]["artifact_bytes"] / q["profile"]["artifact_bytes"] >= 3.3
    assert len(report["layer_errors"]) == 5 and all(e["sqnr_db"] > 20 for e in report["layer_errors"])
    assert any(op.startswith("QLinear") or op == "QGemm" for op in report["runtime_ops"])
    loaded = io.load(tmp_path / "model")
    assert sum(1 for m in loaded.modules() if hasattr(m, "qweight")) == 5


def test_quantize_rejects_options_that_do_not_apply():
    result = runner.invoke(app, ["quantize", "--task", "digits", "--config", "w4", "--calibration", "mse"])
    assert result.exit_code == 2 and "do not apply to w4" in result.output
    result = runner.invoke(app, ["quantize", "--task", "digits", "--config", "int8-dynamic", "--method", "gptq"])
    assert result.exit_code == 2 and "do not apply to int8-dynamic" in result.output


def test_every_config_field_is_reachable_from_the_command_line(tmp_path, digits_task):
    result = runner.invoke(app, ["quantize", "--task", "digits", "--exclude", "0", "--set", "symmetric=false",
                                 "--threads", "1", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    step = json.loads((tmp_path / "q" / "report.json").read_text())["recipe"]["steps"][0]
    assert step["exclude"] == ["0"] and step["symmetric"] is False
    loaded = io.load(tmp_path / "q" / "model")
    assert not hasattr(loaded[0], "qweight") and sum(1 for m in loaded.modules() if hasattr(m, "qweight")) == 4
    result = runner.invoke(app, ["quantize", "--task", "digits", "--set", "rank=3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "rank do not apply to int8-dynamic" in result.output and "exclude" in result.output
    result = runner.invoke(app, ["factorize", "--task", "digits", "--method", "svd", "--ratio", "0.5",
                                 "--rank-multiple", "8", "--threads", "1", "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    ranks = [m.first.weight.shape[0] for m in io.load(tmp_path / "f" / "model").modules() if hasattr(m, "first")]
    assert len(ranks) == 3 and all(r % 8 == 0 for r in ranks)  # the low-rank factor's rows: the rank


def test_quantize_w4_gptq_writes_a_gptq_model_with_less_output_error_than_rtn(tmp_path):
    args = ["quantize", "--task", "digits", "--config", "w4", "--group-size", "32"]
    for method in ("rtn", "gptq"):
        result = runner.invoke(app, [*args, "--method", method, "--out", str(tmp_path / method)])
        assert result.exit_code == 0, result.output
    reports = {m: json.loads((tmp_path / m / "report.json").read_text()) for m in ("rtn", "gptq")}
    assert reports["gptq"]["recipe"]["steps"][0]["method"] == "gptq"
    sqnr = {m: sum(e["sqnr_db"] for e in r["layer_errors"]) / len(r["layer_errors"]) for m, r in reports.items()}
    assert sqnr["gptq"] > sqnr["rtn"] + 3.0  # per-layer output SQNR, dB (measured: ~42 vs ~32)


@pytest.mark.parametrize("stored,given,allowed,expected", [
    ("digits", None, "", "digits"),                                   # a built-in name is a name, not code
    ("digits", "digits", "", "digits"),
    (MY_TASK, MY_TASK, "", MY_TASK),                                  # the command line names the same code
    (MY_TASK, None, f"x:y, {MY_TASK}", MY_TASK),                      # the user's allow-list names it
    ("model:/m?shape=6", "model:/m?shape=6", "", "model:/m?shape=6"),
    ("", "mnist", "", "mnist"),                                       # a --step recipe takes the command's task
    (MY_TASK, None, "", "run again with --task tests.test_cli:digits_through_a_function (or list it in"),
    ("os:abort", None, "os:abort2,os", "run again with --task os:abort"),   # exact entries only
    ("model:/m?data=%2Fd&shape=3x8x8", None, "", "run again with --model /m --data /d --input-shape 3x8x8"),
    ("digits", "mnist", "", "was made for task 'digits', not 'mnist' — give --task digits"),
    ("digits", "os:abort", "os:abort", "not 'os:abort'"),               # the allow-list never overrides a mismatch
    ("", None, "", "names no task — pass --task or --model"),
])
def test_a_file_names_a_task_and_only_the_command_line_chooses_code(stored, given, allowed, expected, monkeypatch):
    monkeypatch.setenv(zoo.TRUSTED_TASKS_ENV, allowed)
    if expected in (stored, given):
        assert zoo.trusted_spec(stored, given, "recipe r.yaml") == expected
    else:
        with pytest.raises(SlimkitError) as err:
            zoo.trusted_spec(stored, given, "recipe r.yaml")
        assert expected in str(err.value) and str(err.value).startswith("recipe r.yaml ")


def test_a_recipe_naming_a_task_function_replays_when_the_command_line_names_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    Recipe.from_steps([{"type": "prune.Magnitude", "amount": 0.5}], task=MY_TASK).save(recipe)
    refused = runner.invoke(app, ["apply", str(recipe), "--out", str(tmp_path / "out")])
    assert refused.exit_code == 2 and f"run again with --task {MY_TASK}" in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
    result = runner.invoke(app, ["apply", str(recipe), "--task", MY_TASK, "--threads", "1",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert Recipe.load(tmp_path / "out" / "recipe.yaml").task == MY_TASK
    weights = [m.weight for m in io.load(tmp_path / "out" / "model").modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)                                # the recipe's step ran on the task
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]   # no lock file left behind
