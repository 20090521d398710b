"""Every technique command is a recipe: the recipe it saves replays to the model it saved, bit for bit,
and a killed run started again the same way resumes to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli import app
from slimkit.pipeline.recipe import Recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "quantize": ["quantize", "--config", "int8-static"],
    "prune-channels+finetune": ["prune", "--method", "channels", "--macs-ratio", "0.6", "--finetune-steps", "20"],
    "prune-gradual": ["prune", "--method", "magnitude", "--amount", "0.6", "--schedule", "gradual",
                      "--finetune-steps", "40"],
    "distill": ["distill", "--steps", "20", "--no-compare"],
    "factorize+distill": ["factorize", "--method", "tucker", "--ratio", "0.5", "--finetune-steps", "20", "--distill"],
    "apply-fuse+qat": ["apply", "--step", "architecture.Fuse", "--step", "quantize.QAT bits=8 steps=10"],
}


def _outputs(model: torch.nn.Module, task: sk.Task) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.eval()(*inputs) for inputs, _ in task.eval[:2]])


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_saved_recipe_replays_to_the_saved_model(name, digits_task, tmp_path, one_thread):
    result = runner.invoke(app, [*COMMANDS[name], "--task", "digits", "--threads", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    recipe = Recipe.load(tmp_path / "recipe.yaml")
    assert recipe.task == "digits" and recipe.steps
    saved = sk.load(tmp_path / "model")
    assert torch.equal(_outputs(recipe.replay(digits_task), digits_task), _outputs(saved, digits_task))
    assert [s.to_dict() for s in recipe.steps] == sk.io.read_meta(tmp_path / "model")["recipe"]
    assert not (tmp_path / "checkpoints").exists()  # removed once the run is through


def test_steps_out_of_stage_order_are_named(tmp_path):
    result = runner.invoke(app, ["apply", "--step", "int8-dynamic", "--step", "architecture.Fuse", "--task", "digits",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "step order: architecture.Fuse (fuse) after a quantize step" in result.output


@pytest.mark.parametrize("step,message", [
    ("quantize.Nope", "unknown technique type 'quantize.Nope'"),
    ("prune.Magnitude amount", "is not key=value"),
    ("prune.Magnitude amount=2", "amount=2 is not a fraction"),
    ("prune.Magnitude colour=red", "unknown option(s) colour"),
])
def test_bad_steps_are_one_line_errors(step, message, tmp_path):
    result = runner.invoke(app, ["apply", "--step", step, "--task", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "model").exists()


@pytest.mark.slow
def test_a_killed_gradual_pruning_run_resumes_bit_identically(digits_task, tmp_path, one_thread):
    out = tmp_path / "run"
    command = [sys.executable, "-c", "from slimkit.cli import app; app()", "prune", "--task", "digits", "--method",
               "magnitude", "--amount", "0.8", "--schedule", "gradual", "--finetune-steps", "300", "--threads", "1",
               "--out", str(out)]
    proc = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        found = sorted(out.glob("checkpoints/*/run0/finetune.pt"))
        if found:
            step = torch.load(found[0], weights_only=True)["step"]
            if step >= 75:  # past two pruning steps (every 27): the masks matter
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert killed_at is not None and 75 <= killed_at < 300, "the run ended before it could be killed"
    again = subprocess.run(command, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = sk.load(out / "model")
    straight = Recipe.load(out / "recipe.yaml").replay(digits_task)
    for (name, a), (_, b) in zip(resumed.state_dict().items(), straight.state_dict().items()):
        assert torch.equal(a, b), name
