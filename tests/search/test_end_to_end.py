"""A real (tiny) search on digits: measured candidates, saved best, replayable recipe, report, CLI errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli.app import app
from slimkit.pipeline.recipe import Recipe
from slimkit.runtime import load_deployed
from slimkit.search.optimize import optimize


@pytest.mark.slow
def test_digits_search_saves_a_replayable_best(digits_task, tmp_path, one_thread):
    base_mb = sk.profile(digits_task.model, digits_task.example).artifact_bytes / 1e6
    target = sk.Target(max_size_mb=base_mb * 0.3, max_drop=0.02, max_latency_vs_original=4.0, threads=1)
    result = optimize(digits_task, target, trials=4, out=tmp_path, technique_names=["magnitude", "int8"],
                      progress=False, sensitivity=False)
    assert result.best is not None, result.hints
    m = result.best.measured
    assert m.size_mb <= base_mb * 0.3 and m.drop <= 0.02
    # the saved artifact is as small as measured, and the recipe replays to the same outputs
    saved = sk.load(tmp_path / "best")
    recipe = Recipe.load(tmp_path / "recipe.yaml")
    replayed = recipe.replay(digits_task)
    x = digits_task.example[0]
    assert torch.equal(saved(x), replayed(x))
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["search"]["best"]["number"] == result.best.number
    # the relative limit became milliseconds from the search's timing of the original ...
    assert result.target.max_latency_ms == pytest.approx(4.0 * result.baseline.latency_ms)
    # ... and the end of the run re-timed the best beside the original and checked it against that timing
    speed = data["search"]["speed"]
    assert isinstance(speed["latency_confirmed"], bool) and "re-timed together with the original" in speed["latency_check"]
    assert speed["vs_original"]["low"] <= speed["vs_original"]["ratio"] <= speed["vs_original"]["high"]
    assert set(speed["timings"]["timings"]) >= {"original", f"1: best (trial {result.best.number})"}
    if m.backend == "onnxruntime":  # the measured file is kept beside best/
        assert speed["onnx"] == str(tmp_path / "best.onnx") and (tmp_path / "best.onnx.json").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "Pareto front" in html and "data:image/png;base64" in html and "Environment" in html
    # where the time went: each trial's steps and measurements add up to (at most) its seconds
    assert "Where the time went" in html and {"measuring the original", "trials"} <= set(result.phases)
    for t in result.trials:
        steps = {s["type"] for s in t.recipe}
        assert t.measured.timings and set(t.measured.timings) - steps <= {"size", "build", "latency", "metric",
                                                                          "checks before training"}
        assert sum(t.measured.timings.values()) <= t.measured.seconds + 1e-6
    # the saved best, built on the runtime it was scored on, gives the score the search reported
    deployed = load_deployed(tmp_path / "best", digits_task.example, threads=1)
    assert digits_task.evaluate(deployed)["score"] == pytest.approx(m.score, abs=1e-9)
    assert recipe.backend == m.backend


def test_recipe_errors_are_one_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("task: digits\nsteps:\n  - type: prune.Telepathy\n")
    with pytest.raises(sk.SlimkitError, match="unknown technique type 'prune.Telepathy'"):
        Recipe.load(bad)
    bad.write_text("task: digits\nsteps: [\n")
    with pytest.raises(sk.SlimkitError, match="not valid YAML"):
        Recipe.load(bad)
    bad.write_text("task: digits\nsteps:\n  - type: prune.Magnitude\n    amount: 0.5\n    colour: red\n")
    with pytest.raises(sk.SlimkitError, match="unknown option"):
        Recipe.load(bad)
    result = CliRunner().invoke(app, ["apply", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_recipe_yaml_round_trip():
    steps = [sk.registered_configs()["prune.Magnitude"](amount=0.4), sk.quantize.Int8(activations="static")]
    r = Recipe(steps=steps, task="digits", seed=3)
    again = Recipe.from_yaml(r.to_yaml())
    assert again.steps == steps and again.seed == 3 and again.task == "digits"


def test_cli_optimize_needs_a_limit():
    result = CliRunner().invoke(app, ["optimize", "--task", "digits"])
    assert result.exit_code == 2 and "no limit given" in result.output
