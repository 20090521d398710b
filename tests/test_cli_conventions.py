"""Command-line conventions shared by every command: --version, help without torch, --out refusing to
overwrite, --json on stdout, one-line errors for a user's own code."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch.nn as nn
from typer.testing import CliRunner

from slimkit import zoo
from slimkit.cli.app import app
from slimkit.cli.out_guard import check_fresh_out
from slimkit.cli.run_summary import optimize_summary
from slimkit.cli.user_errors import user_frame
from slimkit.core.errors import SlimkitError
from slimkit.core.target import Target
from slimkit.core.versions import __version__
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.pareto import TrialRecord
from slimkit.search.result import OptimizeResult

runner = CliRunner()


def test_version_prints_the_package_version_and_exits_0():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"slimkit {__version__}\n"
    assert importlib.metadata.version("slimkit") == __version__


#: Runs the command line in a fresh interpreter and prints, as JSON, its exit code, what it printed and
#: which heavy modules it imported.
HELP_PROBE = """
import contextlib, io, json, sys
from slimkit.cli import app
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        app(sys.argv[1:], prog_name="slimkit")
        code = 0
    except SystemExit as exc:
        code = exc.code
mine = ("slimkit.cli", "slimkit.core.errors")
heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "optuna")}
               | {m for m in sys.modules if m.startswith("slimkit.") and not m.startswith(mine) and m != "slimkit.core"})
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}))
"""


def _probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "COLUMNS": "200"})
    return json.loads(done.stdout)


@pytest.mark.parametrize("args,code,shows", [
    (["--help"], 0, "Usage: slimkit [OPTIONS] COMMAND"),
    (["--version"], 0, f"slimkit {__version__}"),
    (["quantize", "--help"], 0, "Usage: slimkit quantize [OPTIONS]"),
    (["optimize", "--help"], 0, "--max-size-mb"),
    (["prune", "--no-such-option"], 2, "error: No such option: --no-such-option"),
    (["distill", "--lr", "abc"], 2, "error: Invalid value for '--lr'"),
    (["prune", "--lr", "nan"], 2, "error: --lr nan is not a number — give a number > 0"),
])
def test_help_and_argument_errors_do_not_import_torch_or_the_techniques(args, code, shows):
    seen = _probe(*args)
    assert seen["code"] == code
    assert shows in seen["out"] + seen["err"]
    assert seen["heavy"] == []


# ---- --out refuses a previous run unless --overwrite (or optimize --resume) ------------------------------------

NOT_EMPTY = "pass --overwrite to replace what is there or give --out another directory"
OUT_COMMANDS = {"quantize": ["quantize", "--task", "digits"], "prune": ["prune", "--task", "digits"],
                "distill": ["distill", "--task", "digits"], "factorize": ["factorize", "--task", "digits"],
                "apply": ["apply", "--step", "fp16", "--task", "digits"]}


def _tree(root):
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("command,files,extra,message", [
    *[(name, ["report.html"], [], f"is not empty (it holds report.html) — {NOT_EMPTY}") for name in OUT_COMMANDS],
    ("quantize", ["model/model.safetensors", "recipe.yaml", "report.html", "report.json"], [],
     f"is not empty (it holds model, recipe.yaml, report.html, ...) — {NOT_EMPTY}"),
    ("quantize", ["notes.txt", "checkpoints/abc/run0/finetune.pt"], [], f"is not empty (it holds notes.txt) — {NOT_EMPTY}"),
    ("optimize", ["study.db"], [], "is not empty (it holds study.db) — pass --overwrite to replace what is there, "
     "--resume to continue it, or give --out another directory"),
    ("optimize", ["study.db"], ["--resume", "--overwrite"], "--overwrite and --resume contradict each other — give "
     "--resume to continue the run in --out, or --overwrite to start it again"),
])
def test_a_used_out_is_refused_in_one_line_and_left_untouched(command, files, extra, message, tmp_path):
    out = tmp_path / "run"
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    before = _tree(tmp_path)
    args = OUT_COMMANDS.get(command, ["optimize", "--task", "digits", "--max-drop", "0.01"])
    result = runner.invoke(app, [*args, "--out", str(out), *extra])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0] == f"error: --out {out} {message}" if "contradict" not in message else \
        lines == [f"error: {message}"]
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("files,overwrite,resume,refused", [
    ([], False, None, False),                                    # a new directory
    ([".run.slimkit-lock", ".hidden"], False, None, False),      # slimkit's own hidden files
    (["checkpoints/abc/run0/finetune.pt"], False, None, False),  # a killed technique run resumes
    (["report.html"], False, None, True),
    (["report.html"], True, None, False),
    (["study.db"], False, False, True),
    (["study.db"], False, True, False),                          # optimize --resume continues the run
    (["study.db"], True, False, False),
])
def test_which_out_directories_count_as_a_previous_run(files, overwrite, resume, refused, tmp_path):
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    if refused:
        with pytest.raises(SlimkitError, match="is not empty"):
            check_fresh_out(tmp_path, overwrite=overwrite, resume=resume)
    else:
        check_fresh_out(tmp_path, overwrite=overwrite, resume=resume)


def test_the_demo_reruns_into_its_out_without_overwrite(tmp_path):
    (tmp_path / "report.html").write_text("the previous demo")
    result = runner.invoke(app, ["demo", "--task", "cifar", "--out", str(tmp_path)])
    assert result.exit_code == 2 and result.output.startswith("error: unknown task 'cifar'")  # past the --out check


# ---- --json: the summary alone on stdout ----------------------------------------------------------------------

def test_json_prints_the_summary_alone_on_stdout_and_a_rerun_needs_overwrite(tmp_path, one_thread):
    out = tmp_path / "q"
    args = ["quantize", "--task", "digits", "--threads", "1", "--out", str(out), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout.count("\n") == 1
    summary = json.loads(first.stdout)
    base, final = json.loads((out / "report.json").read_text())["candidates"]
    assert summary["command"] == "quantize" and summary["task"] == "digits" and summary["candidate"] == "int8-dynamic"
    assert summary["metric"] == final["metric"]["score"] and summary["baseline_metric"] == base["metric"]["score"]
    assert summary["size_ratio"] == base["profile"]["artifact_bytes"] / final["profile"]["artifact_bytes"]
    assert summary["backend"] == final["backend"] and summary["params"] == final["profile"]["params_total"]
    assert summary["speedup"] == final["speedup"]["ratio"]
    assert (summary["out"], summary["model"], summary["report"]) == (str(out), str(out / "model"),
                                                                     str(out / "report.html"))
    assert f"{summary['size_ratio']:.2f}x smaller" in first.stderr          # the console line went to stderr

    before = _tree(out)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and again.stdout == "" and "is not empty" in again.stderr
    assert _tree(out) == before
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.stdout)["metric"] == summary["metric"]
    assert (out / "model").stat().st_mtime_ns > before["model"]


def _optimize_result(tmp_path, best: bool) -> OptimizeResult:
    base = TrialMeasurement(size_mb=0.2, params=1000, latency_ms=0.5, score=0.99, backend="torch")
    trial = TrialRecord(number=3, recipe=[{"type": "prune.Magnitude"}, {"type": "quantize.Int8"}], constraints=[-1.0],
                        measured=TrialMeasurement(size_mb=0.05, params=600, latency_ms=0.25, score=0.98, drop=0.01,
                                                  backend="onnxruntime"))
    speed = {"vs_original": {"ratio": 2.0}, "text": "2.00x", "same_runtime": {"ratio": 1.5}, "backend": "onnxruntime",
             "emulated": None, "latency_confirmed": True}
    return OptimizeResult(task="digits", target=Target(max_drop=0.01), baseline=base, trials=[trial] * 4,
                          best=trial if best else None, pareto=[], closest=[], hints=[] if best else ["raise --max-drop"],
                          sensitivity={}, study="s", storage="sqlite://", seconds=1.0, out=tmp_path,
                          speed=speed if best else None)


@pytest.mark.parametrize("best,expected", [
    (True, {"candidate": "Magnitude + Int8", "trial": 3, "backend": "onnxruntime", "metric": 0.98,
            "baseline_metric": 0.99, "metric_change": pytest.approx(-0.01), "drop": 0.01, "size_ratio": 4.0, "speedup": 2.0, "speedup_text": "2.00x",
            "speedup_same_runtime": 1.5, "speed_claimed": True, "latency_confirmed": True, "params": 600,
            "baseline_params": 1000, "hints": [], "model": "best", "recipe": "recipe.yaml"}),
    (False, {"candidate": None, "metric": None, "size_ratio": None, "speedup": None, "speed_claimed": False,
             "baseline_metric": 0.99, "hints": ["raise --max-drop"], "model": None, "recipe": None}),
])
def test_optimize_json_holds_the_console_summary_numbers(best, expected, tmp_path):
    summary = optimize_summary(_optimize_result(tmp_path, best))
    assert json.loads(json.dumps(summary)) == summary
    assert summary["trials"] == 4 and summary["report"] == str(tmp_path / "report.html")
    for key, value in expected.items():
        if key in ("model", "recipe") and value is not None:
            value = str(tmp_path / value)
        assert summary[key] == value, key


# ---- an exception in the user's own code: its line and frame, the traceback with --debug ----------------------

MY_TASK = "tests.test_cli_conventions:task_whose_metric_fails"


def task_whose_metric_fails():  # noqa: ANN201  (a user's own task function)
    def my_metric(model, batches):  # noqa: ANN001, ANN202
        scores = {"top1": 1.0}
        return scores["accuracy"]  # the user's bug

    return dataclasses.replace(zoo.load("digits"), metric=my_metric)


def test_an_error_in_user_code_is_one_line_and_the_users_frame(tmp_path):
    result = runner.invoke(app, ["quantize", "--task", MY_TASK, "--out", str(tmp_path / "q")])
    assert result.exit_code == 1
    line = inspect.getsourcelines(task_whose_metric_fails)[1] + 3
    assert result.stderr.splitlines() == [
        "error: KeyError: 'accuracy' — raised in your code (below); run again as slimkit --debug COMMAND ... for "
        "the full traceback",
        f"  {__file__}:{line} in my_metric: return scores[\"accuracy\"]  # the user's bug"]
    assert not (tmp_path / "q").exists()


def test_debug_shows_the_full_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "quantize", "--task", MY_TASK, "--out", str(tmp_path / "q")])
    assert isinstance(result.exception, KeyError) and result.exception.args == ("accuracy",)
    frames = [f.name for f in traceback.extract_tb(result.exception.__traceback__)]
    assert frames[-1] == "my_metric" and "wrapper" in frames  # through slimkit's own frames


def test_an_error_with_no_user_frame_keeps_its_traceback():
    try:
        nn.Linear(2, 2)(None)
    except TypeError as exc:
        assert user_frame(exc.__traceback__).name == "test_an_error_with_no_user_frame_keeps_its_traceback"
        assert user_frame(exc.__traceback__.tb_next) is None  # torch's frames only: not the user's code


# ---- one default task for every command ---------------------------------------------------------------------

TASK_COMMANDS = ["profile", "quantize", "prune", "distill", "factorize", "optimize", "demo"]


@pytest.mark.parametrize("command", TASK_COMMANDS)
def test_every_command_names_the_same_default_task(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if "--task" in line)
    assert "default: digits" in line or "[default: digits]" in line, line


def test_profile_without_a_task_profiles_digits(tmp_path, digits_task):
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["profile", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["params_total"] == sum(p.numel() for p in digits_task.model.parameters())
