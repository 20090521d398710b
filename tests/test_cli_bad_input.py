"""Bad input to every command: one line on stderr starting ``error:``, exit code 2, no traceback, and
nothing written. Every case fails before a model is built (up-front checks), so the table is fast.

A file never chooses code: recipes, result files and studies naming a task that is not built in
are refused unless the command line names the same task; the probe module below records any
import or call, and ``os:abort`` would end this very process.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional, get_args, get_type_hints

import pytest
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.cli.numeric_options import NUMERIC_OPTIONS
from slimkit.cli.out_guard import LOCK_SUFFIX, guarded_out

runner = CliRunner()
PROBE = f"slimkit_probe_{uuid.uuid4().hex[:8]}"  # a module that leaves marks when imported or called
PROBE_SOURCE = f"""
from pathlib import Path
Path(__file__).with_name("imported.mark").write_text("imported")

def make():
    Path(__file__).with_name("called.mark").write_text("called")

def factory():
    Path(__file__).with_name("called.mark").write_text("called")
"""
RECIPES = {  # file name -> its text (bytes for binary files)
    "abort.yaml": 'task: "os:abort"\nsteps:\n  - type: quantize.Float16\n',
    "getpid.yaml": 'task: "os:getpid"\nsteps:\n  - type: quantize.Float16\n',
    "probe.yaml": f'task: "{PROBE}:make"\nsteps:\n  - type: quantize.Float16\n',
    "probe_model.yaml": f'task: "model:{PROBE}:factory?shape=6"\nsteps:\n  - type: quantize.Float16\n',
    "model_dir.yaml": 'task: "model:/opt/someone/else"\nsteps:\n  - type: quantize.Float16\n',
    "digits.yaml": "task: digits\nsteps:\n  - type: quantize.Float16\n",
    "no_task.yaml": "steps:\n  - type: quantize.Float16\n",
    "empty.yaml": "",
    "list.yaml": "- task\n- steps\n",
    "python_tag.yaml": "!!python/object/apply:os.system ['echo pwned']\n",
    "broken.yaml": "task: digits\nsteps: [\n",
    "seed_text.yaml": "task: digits\nseed: abc\nsteps: []\n",
    "seed_negative.yaml": "task: digits\nseed: -1\nsteps: []\n",
    "task_list.yaml": "task: [os, abort]\nsteps: []\n",
    "target_number.yaml": "task: digits\ntarget: 5\nsteps: []\n",
    "steps_mapping.yaml": "task: digits\nsteps: {type: quantize.Float16}\n",
    "step_no_type.yaml": "task: digits\nsteps:\n  - bits: 4\n",
    "step_nan.yaml": "task: digits\nsteps:\n  - type: prune.Magnitude\n    amount: .nan\n",
    "step_unknown.yaml": "task: digits\nsteps:\n  - type: prune.Telepathy\n",
    "recipe.pkl": pickle.dumps({"task": "os:abort", "steps": []}),
    "binary.yaml": bytes(range(256)),
    "nul.yaml": "task: digits\x00\nsteps: []\n",
    "deep.yaml": "[" * 100_000 + "]" * 100_000,
}
RESULTS = {  # run directory -> its result.json (bytes for binary files)
    "run_binary": bytes(range(256)),
    "run_list": "[]",
    "run_not_json": "{task: digits",
    "run_no_task": '{"trials": []}',
    "run_task_number": '{"task": 5}',
    "run_abort": '{"task": "os:abort"}',
    "run_probe": json.dumps({"task": f"{PROBE}:make"}),
    "run_digits": '{"task": "digits"}',
    "run_deep": "[" * 100_000 + "]" * 100_000,
}
ALL_NUMBERS = "a number >= 0"
OUT_COMMANDS = [["quantize"], ["prune"], ["factorize"], ["distill"], ["optimize", "--max-drop", "0.01"],
                ["apply", "--step", "fp16", "--task", "digits"], ["demo"]]

CASES = [
    # --- numbers: NaN, infinity, negative, zero where invalid, out of range (before any model) ---
    ("profile-threads-0", ["profile", "--threads", "0"], "--threads 0 is out of range — give a number >= 1"),
    ("profile-threads-neg", ["profile", "--threads", "-2"], "--threads -2 is out of range"),
    ("quantize-max-drop-nan", ["quantize", "--max-drop", "nan"],
     "--max-drop nan is not a number — give " + ALL_NUMBERS),
    ("quantize-max-drop-neg", ["quantize", "--max-drop", "-0.1"], "--max-drop -0.1 is out of range"),
    ("quantize-max-drop-inf", ["quantize", "--max-drop", "inf"], "--max-drop inf is not finite"),
    ("quantize-percentile-101", ["quantize", "--config", "int8-static", "--percentile", "101"],
     "--percentile 101 is out of range — give a number in (50, 100]"),
    ("quantize-percentile-nan", ["quantize", "--percentile", "nan"], "--percentile nan is not a number"),
    ("quantize-group-size-neg", ["quantize", "--config", "w4", "--group-size", "-32"],
     "--group-size -32 is out of range"),
    ("quantize-embedding-bits-3", ["quantize", "--embedding-bits", "3"],
     "--embedding-bits 3 is out of range — give one of 4, 8"),
    ("quantize-threads-0", ["quantize", "--threads", "0"], "--threads 0 is out of range"),
    ("prune-lr-neg", ["prune", "--finetune-steps", "5", "--lr", "-1"], "--lr -1 is out of range — give a number > 0"),
    ("prune-lr-zero", ["prune", "--finetune-steps", "5", "--lr", "0"], "--lr 0 is out of range"),
    ("prune-lr-nan", ["prune", "--lr", "nan"], "--lr nan is not a number"),
    ("prune-lr-inf", ["prune", "--lr", "inf"], "--lr inf is not finite"),
    ("prune-amount-1.5", ["prune", "--method", "magnitude", "--amount", "1.5"],
     "--amount 1.5 is out of range — give a number in [0, 1)"),
    ("prune-amount-1", ["prune", "--amount", "1"], "--amount 1 is out of range"),
    ("prune-amount-neg", ["prune", "--amount", "-0.1"], "--amount -0.1 is out of range"),
    ("prune-macs-ratio-0", ["prune", "--macs-ratio", "0"], "--macs-ratio 0 is out of range — give a number in (0, 1]"),
    ("prune-macs-ratio-1.2", ["prune", "--macs-ratio", "1.2"], "--macs-ratio 1.2 is out of range"),
    ("prune-finetune-steps-neg", ["prune", "--finetune-steps", "-1"], "--finetune-steps -1 is out of range"),
    ("prune-round-to-0", ["prune", "--round-to", "0"], "--round-to 0 is out of range"),
    ("prune-latency-batch-0", ["prune", "--latency-batch", "0"], "--latency-batch 0 is out of range"),
    ("prune-n-not-below-m", ["prune", "--method", "nm", "--n", "4", "--m", "2"], "--n 4 --m 2 is not an N:M pattern"),
    ("factorize-ratio-0", ["factorize", "--ratio", "0"], "--ratio 0 is out of range — give a number in (0, 1]"),
    ("factorize-ratio-1.5", ["factorize", "--ratio", "1.5"], "--ratio 1.5 is out of range"),
    ("factorize-ratio-nan", ["factorize", "--ratio", "nan"], "--ratio nan is not a number"),
    ("factorize-energy-2", ["factorize", "--method", "svd", "--energy", "2"], "--energy 2 is out of range"),
    ("factorize-lr-neg", ["factorize", "--finetune-steps", "3", "--lr", "-0.5"], "--lr -0.5 is out of range"),
    ("factorize-finetune-steps-neg", ["factorize", "--finetune-steps", "-3"], "--finetune-steps -3 is out of range"),
    ("factorize-rank-multiple-0", ["factorize", "--rank-multiple", "0"], "--rank-multiple 0 is out of range"),
    ("distill-steps-0", ["distill", "--steps", "0"], "--steps 0 is out of range — give a number >= 1"),
    ("distill-lr-nan", ["distill", "--lr", "nan"], "--lr nan is not a number"),
    ("distill-lr-neg", ["distill", "--lr", "-1e-3"], "--lr -0.001 is out of range"),
    ("distill-temperature-0", ["distill", "--temperature", "0"], "--temperature 0 is out of range"),
    ("distill-temperature-inf", ["distill", "--temperature", "inf"], "--temperature inf is not finite"),
    ("distill-alpha-1.5", ["distill", "--alpha", "1.5"], "--alpha 1.5 is out of range — give a number in [0, 1]"),
    ("distill-alpha-nan", ["distill", "--alpha", "nan"], "--alpha nan is not a number"),
    ("distill-relational-neg", ["distill", "--relational", "-1"], "--relational -1 is out of range"),
    ("optimize-max-size-0", ["optimize", "--max-size-mb", "0"], "--max-size-mb 0 is out of range — give a number > 0"),
    ("optimize-max-size-nan", ["optimize", "--max-size-mb", "nan"], "--max-size-mb nan is not a number"),
    ("optimize-max-latency-neg", ["optimize", "--max-latency-ms", "-1"], "--max-latency-ms -1 is out of range"),
    ("optimize-max-memory-inf", ["optimize", "--max-memory-mb", "inf"], "--max-memory-mb inf is not finite"),
    ("optimize-max-drop-nan", ["optimize", "--max-drop", "nan"], "--max-drop nan is not a number"),
    ("optimize-trials-0", ["optimize", "--max-drop", "0.01", "--trials", "0"], "--trials 0 is out of range"),
    ("optimize-time-budget-0", ["optimize", "--max-drop", "0.01", "--time-budget", "0"],
     "--time-budget 0 is out of range"),
    ("optimize-time-budget-nan", ["optimize", "--max-drop", "0.01", "--time-budget", "nan"],
     "--time-budget nan is not a number"),
    ("optimize-seed-neg", ["optimize", "--max-drop", "0.01", "--seed", "-1"], "--seed -1 is out of range"),
    ("optimize-seed-huge", ["optimize", "--max-drop", "0.01", "--seed", str(2**40)], f"--seed {2**40} is out of range"),
    ("optimize-threads-0", ["optimize", "--max-drop", "0.01", "--threads", "0"], "--threads 0 is out of range"),
    ("optimize-strategy", ["optimize", "--max-drop", "0.01", "--strategy", "random"], "unknown strategy 'random'"),
    ("optimize-no-limit", ["optimize"], "no limit given"),
    ("optimize-techniques", ["optimize", "--max-drop", "0.01", "--techniques", "int8,telepathy"],
     "unknown technique(s) telepathy"),
    ("apply-seed-neg", ["apply", "--step", "fp16", "--task", "digits", "--seed", "-1"], "--seed -1 is out of range"),
    ("apply-threads-0", ["apply", "--step", "fp16", "--task", "digits", "--threads", "0"],
     "--threads 0 is out of range"),
    ("demo-trials-0", ["demo", "--trials", "0"], "--trials 0 is out of range"),
    ("demo-time-budget-neg", ["demo", "--time-budget", "-5"], "--time-budget -5 is out of range"),
    ("demo-threads-neg", ["demo", "--threads", "-1"], "--threads -1 is out of range"),
    ("worker-trials-0", ["worker", "--study", "s", "--storage", "sqlite:///{tmp}/s.db", "--trials", "0"],
     "--trials 0 is out of range"),
    ("worker-time-budget-nan", ["worker", "--study", "s", "--storage", "sqlite:///{tmp}/s.db", "--time-budget", "nan"],
     "--time-budget nan is not a number"),
    ("worker-wait-neg", ["worker", "--study", "s", "--storage", "sqlite:///{tmp}/s.db", "--wait", "-1"],
     "--wait -1 is out of range"),
    ("worker-wait-inf", ["worker", "--study", "s", "--storage", "sqlite:///{tmp}/s.db", "--wait", "inf"],
     "--wait inf is not finite"),
    # --- what the option parser refuses: the same one-line form ---
    ("prune-lr-text", ["prune", "--lr", "abc"], "error: Invalid value for '--lr': "),
    ("prune-steps-fraction", ["prune", "--finetune-steps", "1.5"], "Invalid value for '--finetune-steps'"),
    ("quantize-unknown-option", ["quantize", "--bits", "4"], "No such option: --bits"),
    ("worker-missing-study", ["worker", "--storage", "sqlite:///{tmp}/s.db"],
     "Missing option '--study'. — see "),
    ("apply-two-recipes", ["apply", "{tmp}/digits.yaml", "{tmp}/abort.yaml"], "Got unexpected extra argument(s)"),
    ("unknown-command", ["compress"], "No such command 'compress'. — see "),
    # --- options that cannot go together or name nothing (checked without building anything) ---
    ("profile-device", ["profile", "--device", "tpu"], "--device 'tpu' is not supported"),
    ("profile-json-dir", ["profile", "--json", "{tmp}"], "is a directory — give --json a file path"),
    ("profile-json-under-file", ["profile", "--json", "{tmp}/digits.yaml/p.json"], "sits under the file"),
    ("quantize-task-and-model", ["quantize", "--task", "digits", "--model", "{tmp}"],
     "give --task or --model, not both"),
    ("quantize-model-missing", ["quantize", "--model", "{tmp}/no_such_dir"], "no model at '{tmp}/no_such_dir'"),
    ("quantize-weights-missing", ["quantize", "--model", "{tmp}", "--weights", "{tmp}/w.safetensors"],
     "--weights {tmp}/w.safetensors does not exist"),
    ("quantize-input-shape", ["quantize", "--model", "{tmp}", "--input-shape", "3xbig"],
     "--input-shape '3xbig' is not a shape"),
    ("quantize-metric", ["quantize", "--model", "{tmp}", "--metric", "vibes"], "unknown metric 'vibes'"),
    ("distill-student", ["distill", "--student", "{tmp}/nowhere"],
     "is not 'self', 'layers:N' or an artifact directory"),
    # --- user task functions that fail: one line naming them ---
    ("task-needs-argument", ["profile", "--task", "tests.test_cli_bad_input:task_needing_an_argument"],
     "cannot be called without arguments"),
    ("task-raises", ["profile", "--task", "tests.test_cli_bad_input:task_that_raises"],
     "failed: RuntimeError: the data server is down"),
    ("task-returns-none", ["profile", "--task", "tests.test_cli_bad_input:task_returning_none"],
     "returned NoneType, not a slimkit.Task"),
    ("model-factory-raises", ["profile", "--model", "tests.test_cli_bad_input:task_that_raises"],
     "building the task for --model tests.test_cli_bad_input:task_that_raises failed: RuntimeError: the data"),
    ("model-factory-needs-argument", ["profile", "--model", "tests.test_cli_bad_input:task_needing_an_argument"],
     "failed: TypeError: task_needing_an_argument() missing 1 required positional argument: 'size'"),
    # --- recipes: missing, corrupt, wrong types; code named by the file is never run ---
    ("apply-missing", ["apply", "{tmp}/missing.yaml"], "does not exist"),
    ("apply-directory", ["apply", "{tmp}"], "is a directory"),
    ("apply-pickle", ["apply", "{tmp}/recipe.pkl"], "is not a text file (not UTF-8)"),
    ("apply-binary", ["apply", "{tmp}/binary.yaml"], "is not a text file (not UTF-8)"),
    ("apply-nul", ["apply", "{tmp}/nul.yaml"], "is not a text file (it holds NUL bytes)"),
    ("apply-deep", ["apply", "{tmp}/deep.yaml"], "recipe is nested too deeply to be a recipe"),
    ("apply-empty", ["apply", "{tmp}/empty.yaml"], "recipe has no 'steps' list"),
    ("apply-list", ["apply", "{tmp}/list.yaml"], "recipe has no 'steps' list"),
    ("apply-python-tag", ["apply", "{tmp}/python_tag.yaml"], "recipe is not valid YAML at line 1"),
    ("apply-broken-yaml", ["apply", "{tmp}/broken.yaml"], "recipe is not valid YAML"),
    ("apply-seed-text", ["apply", "{tmp}/seed_text.yaml"], "recipe seed 'abc' is not a whole number"),
    ("apply-seed-negative", ["apply", "{tmp}/seed_negative.yaml"], "recipe seed -1 is not a whole number"),
    ("apply-task-list", ["apply", "{tmp}/task_list.yaml"], "recipe task ['os', 'abort'] is not a task name"),
    ("apply-target-number", ["apply", "{tmp}/target_number.yaml"], "recipe target 5 is not a mapping of limits"),
    ("apply-steps-mapping", ["apply", "{tmp}/steps_mapping.yaml"], "recipe has no 'steps' list"),
    ("apply-step-no-type", ["apply", "{tmp}/step_no_type.yaml"], "recipe step 1 has no 'type'"),
    ("apply-step-nan", ["apply", "{tmp}/step_nan.yaml"], "amount=nan is not a fraction"),
    ("apply-step-unknown", ["apply", "{tmp}/step_unknown.yaml"], "unknown technique type 'prune.Telepathy'"),
    ("apply-no-task", ["apply", "{tmp}/no_task.yaml"], "names no task — pass --task or --model"),
    ("apply-step-no-task", ["apply", "--step", "fp16"], "--step needs a task to apply to"),
    ("apply-abort", ["apply", "{tmp}/abort.yaml"],
     "names the task 'os:abort', which is not built in: only the command line chooses code or models to load — "
     "if you trust it, run again with --task os:abort"),
    ("apply-getpid", ["apply", "{tmp}/getpid.yaml"], "if you trust it, run again with --task os:getpid"),
    ("apply-probe", ["apply", "{tmp}/probe.yaml"], f"run again with --task {PROBE}:make"),
    ("apply-probe-model", ["apply", "{tmp}/probe_model.yaml"],
     f"run again with --model {PROBE}:factory --input-shape 6"),
    ("apply-model-dir", ["apply", "{tmp}/model_dir.yaml"], "run again with --model /opt/someone/else"),
    ("apply-mismatch-builtin", ["apply", "{tmp}/digits.yaml", "--task", "mnist"],
     "was made for task 'digits', not 'mnist' — give --task digits, the task it was made for"),
    ("apply-mismatch-code", ["apply", "{tmp}/abort.yaml", "--task", "os:getpid"],
     "was made for task 'os:abort', not 'os:getpid' — give --task os:abort"),
    ("apply-mismatch-probe", ["apply", "{tmp}/probe.yaml", "--task", f"{PROBE}:other"], f"not '{PROBE}:other'"),
    ("apply-mismatch-model", ["apply", "{tmp}/probe_model.yaml", "--model", f"{PROBE}:factory"],
     f"was made for task 'model:{PROBE}:factory?shape=6', not 'model:{PROBE}:factory'"),
    # --- result files of slimkit report ---
    ("report-missing", ["report", "{tmp}/nowhere"], "holds no result.json"),
    ("report-binary", ["report", "{tmp}/run_binary"], "result.json is not UTF-8 text"),
    ("report-deep", ["report", "{tmp}/run_deep"], "result.json is nested too deeply to be a result file"),
    ("report-list", ["report", "{tmp}/run_list"], "is not a slimkit result file (no task name)"),
    ("report-not-json", ["report", "{tmp}/run_not_json"], "result.json is not JSON (line 1)"),
    ("report-no-task", ["report", "{tmp}/run_no_task"], "is not a slimkit result file (no task name)"),
    ("report-task-number", ["report", "{tmp}/run_task_number"], "is not a slimkit result file (no task name)"),
    ("report-abort", ["report", "{tmp}/run_abort"], "names the task 'os:abort', which is not built in"),
    ("report-probe", ["report", "{tmp}/run_probe"], f"run again with --task {PROBE}:make"),
    ("report-mismatch", ["report", "{tmp}/run_digits", "--task", "mnist"], "was made for task 'digits', not 'mnist'"),
    ("report-mismatch-code", ["report", "{tmp}/run_abort", "--task", "os:getpid"], "not 'os:getpid'"),
    # --- slimkit export ---
    ("export-missing", ["export", "{tmp}/nowhere", "--out", "{tmp}/m.onnx"], "does not exist"),
    ("export-suffix", ["export", "{tmp}/run_digits", "--out", "{tmp}/m.txt"], "does not end in .onnx"),
    ("export-format", ["export", "{tmp}/run_digits", "--format", "tflite", "--out", "{tmp}/m.onnx"],
     "--format 'tflite' is not supported"),
    ("export-threads", ["export", "{tmp}/run_digits", "--threads", "0", "--out", "{tmp}/m.onnx"], "--threads 0"),
    ("export-no-example", ["export", "{tmp}/run_digits", "--out", "{tmp}/m.onnx"], "needs example inputs"),
    # --- studies read by slimkit worker ---
    ("worker-abort", ["worker", "--study", "abort", "--storage", "sqlite:///{tmp}/studies.db", "--wait", "0"],
     "study 'abort' names the task 'os:abort', which is not built in"),
    ("worker-probe", ["worker", "--study", "probe", "--storage", "sqlite:///{tmp}/studies.db", "--wait", "0"],
     f"run again with --task {PROBE}:make"),
    ("worker-mismatch", ["worker", "--study", "digits", "--storage", "sqlite:///{tmp}/studies.db", "--wait", "0",
                         "--task", "mnist"], "study 'digits' was made for task 'digits', not 'mnist'"),
    ("worker-mismatch-code", ["worker", "--study", "abort", "--storage", "sqlite:///{tmp}/studies.db", "--wait", "0",
                              "--task", "os:getpid"], "not 'os:getpid' — give --task os:abort"),
    ("worker-no-study", ["worker", "--study", "nope", "--storage", "sqlite:///{tmp}/studies.db", "--wait", "0"],
     "there is no study 'nope'"),
    # --- --out: a file, under a file, a place nobody can write ---
    *[(f"{c[0]}-out-file", [*c, "--out", "{tmp}/digits.yaml"], "digits.yaml is a file, not a directory — give --out a "
       "directory path") for c in OUT_COMMANDS],
    *[(f"{c[0]}-out-under-file", [*c, "--out", "{tmp}/digits.yaml/run"], "sits under the file") for c in OUT_COMMANDS],
    *[(f"{c[0]}-out-read-only", [*c, "--out", "/sys/slimkit-out"], "give --out a place you can write")
      for c in OUT_COMMANDS],
    ("report-run-dir-file", ["report", "{tmp}/digits.yaml"], "holds no result.json"),
]


def task_needing_an_argument(size: int):  # noqa: ANN201  (task functions the cases call)
    raise AssertionError("never called")


def task_that_raises():  # noqa: ANN201
    raise RuntimeError("the data server is down\nsecond line of detail")


def task_returning_none():  # noqa: ANN201
    return None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file the cases read: recipes, result directories, a study database, the probe module."""
    tmp = tmp_path_factory.mktemp("inputs")
    for name, text in RECIPES.items():
        (tmp / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    for name, text in RESULTS.items():
        (tmp / name).mkdir()
        (tmp / name / "result.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp / f"{PROBE}.py").write_text(PROBE_SOURCE)
    _studies(tmp / "studies.db", {"abort": "os:abort", "probe": f"{PROBE}:make", "digits": "digits"})
    return tmp


def _studies(path: Path, tasks: dict[str, str]) -> None:
    import optuna

    storage = f"sqlite:///{path}"
    for name, task in tasks.items():
        study = optuna.create_study(study_name=name, storage=storage)
        for key, value in {"task": task, "baseline": {"score": 1.0}, "target": {"max_drop": 0.01},
                           "techniques": ["int8"], "trials": 2}.items():
            study.set_user_attr(key, value)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_line_error(result, message: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, (SystemExit, type(None))), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and " — " in lines[0], lines[0]
    assert message in lines[0], lines[0]


@pytest.mark.parametrize("args,message", [pytest.param(a, m, id=i) for i, a, m in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(args, message, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # default --out directories land here, if anywhere
    monkeypatch.syspath_prepend(str(inputs))         # the probe module is importable: only refusal keeps it out
    monkeypatch.delenv("SLIMKIT_TRUSTED_TASKS", raising=False)
    before = {"inputs": _tree(inputs), "cwd": _tree(tmp_path)}
    result = runner.invoke(app, [a.replace("{tmp}", str(inputs)) for a in args])
    assert_one_line_error(result, message.replace("{tmp}", str(inputs)))
    assert {"inputs": _tree(inputs), "cwd": _tree(tmp_path)} == before       # nothing half-written
    assert PROBE not in sys.modules                                          # never imported, never called
    assert not (inputs / "imported.mark").exists() and not (inputs / "called.mark").exists()


def test_case_table_covers_every_command():
    commands = {c.callback.__name__.replace("_steps", "") for c in app.registered_commands}
    tested = {args[0] for _, args, _ in CASES}
    assert commands - tested == {"tasks", "techniques"}                 # the two that take no input
    assert len(CASES) >= 60


def test_every_numeric_option_of_every_command_has_a_range():
    numeric = {}
    for command in app.registered_commands:
        for name, hint in get_type_hints(command.callback).items():
            if hint in (int, float, Optional[int], Optional[float]) or set(get_args(hint)) & {int, float}:
                numeric.setdefault(name, []).append(command.callback.__name__)
    assert set(numeric) <= set(NUMERIC_OPTIONS), set(numeric) - set(NUMERIC_OPTIONS)
    assert len(numeric) == len(NUMERIC_OPTIONS) == 27


@pytest.mark.parametrize("command", [pytest.param(c, id=c[0]) for c in OUT_COMMANDS])
def test_a_second_run_on_a_locked_out_is_refused_at_once(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with guarded_out(out):                            # a first run holds --out
        (out / "model.safetensors").write_bytes(b"first run's")
        before = _tree(tmp_path)
        result = runner.invoke(app, [*command, "--out", str(out)])
        assert_one_line_error(result, f"another slimkit run is writing --out {out}")
        assert _tree(tmp_path) == before
        assert (out / "model.safetensors").read_bytes() == b"first run's"
    assert _tree(tmp_path) == {"run", "run/model.safetensors"}            # the lock file went with the run


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from slimkit.cli import main; main()", *args]


def test_a_recipe_naming_os_abort_leaves_the_process_alive(inputs, tmp_path):
    done = subprocess.run(_cli("apply", str(inputs / "abort.yaml"), "--out", str(tmp_path / "o")),
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)          # -6 would be SIGABRT
    assert done.stderr.count("\n") == 1 and "run again with --task os:abort" in done.stderr
    assert _tree(tmp_path) == set()


def test_a_killed_run_leaves_a_lock_file_that_blocks_nobody(tmp_path):
    out = tmp_path / "run"
    hold = ("import time; from pathlib import Path; from slimkit.cli.out_guard import guarded_out\n"
            f"with guarded_out(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = tmp_path / f".run{LOCK_SUFFIX}"
        refused = subprocess.run(_cli("quantize", "--out", str(out)), capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert f"another slimkit run is writing --out {out} (it holds {lock})" in refused.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert lock.exists()                               # the killed run could not clean up ...
    result = runner.invoke(app, ["quantize", "--task", "cifar", "--out", str(out)])
    assert_one_line_error(result, "unknown task 'cifar'")              # ... yet the next run got past the lock
    assert not lock.exists()


def test_a_full_disk_is_found_before_any_work(tmp_path):
    def limit_file_size() -> None:  # writes past 4 KiB fail (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    done = subprocess.run(_cli("quantize", "--out", str(tmp_path / "run")), capture_output=True, text=True,
                          timeout=120, preexec_fn=limit_file_size, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1
    assert f"--out {tmp_path / 'run'} cannot be written (File too large)" in done.stderr
    assert _tree(tmp_path) == set()
