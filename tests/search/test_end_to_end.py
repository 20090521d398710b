"""A real (tiny) search on digits: measured candidates, best/ copied from the incumbent its trial saved (no
rebuild), a recipe that replays to it, a damaged incumbent replayed with the reason said, report, CLI errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

import slimkit as sk
from slimkit.cli.app import app
from slimkit.pipeline.recipe import Recipe
from slimkit.runtime import load_deployed
from slimkit.search.optimize import optimize


@pytest.mark.slow
def test_digits_search_saves_a_replayable_best(digits_task, tmp_path, one_thread, capsys, caplog):
    base_mb = sk.profile(digits_task.model, digits_task.example).artifact_bytes / 1e6
    target = sk.Target(max_size_mb=base_mb * 0.3, max_drop=0.02, max_latency_vs_original=4.0, threads=1)
    result = optimize(digits_task, target, trials=4, out=tmp_path, technique_names=["magnitude", "int8"],
                      sensitivity=False)
    assert result.best is not None, result.hints
    m = result.best.measured
    assert m.size_mb <= base_mb * 0.3 and m.drop <= 0.02
    # best/ is the incumbent the best trial saved when it finished, copied byte for byte: nothing replayed
    said = capsys.readouterr().out
    assert "search stopped: trials done: 4 of 4 finished; writing best/" in said and "best so far, saved" in said
    assert result.stopped == "trials done: 4 of 4 finished" and result.best_source == "incumbent"
    assert "copying the saved best" in result.phases and "rebuilding the best (replay)" not in result.phases
    meta = sk.io.read_meta(tmp_path / "best")
    assert meta == sk.io.read_meta(tmp_path / "incumbent") and meta["extra"]["incumbent"]["trial"] == result.best.number
    assert (tmp_path / "best" / sk.io.WEIGHTS).read_bytes() == (tmp_path / "incumbent" / sk.io.WEIGHTS).read_bytes()
    # ... and the recipe (slimkit apply) replays to the same outputs
    saved = sk.load(tmp_path / "best")
    recipe = Recipe.load(tmp_path / "recipe.yaml")
    replayed = recipe.replay(digits_task)
    x = digits_task.example[0]
    assert torch.equal(saved(x), replayed(x)) and torch.equal(result.best_model(x), saved(x))
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["search"]["best"]["number"] == result.best.number
    assert data["search"]["best_source"] == "incumbent" and data["search"]["stopped"] == result.stopped
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
                                                                          "checks before training", "re-timing with the original"}
        assert sum(t.measured.timings.values()) <= t.measured.seconds + 1e-6
    # the saved best, built on the runtime it was scored on, gives the score the search reported
    deployed = load_deployed(tmp_path / "best", digits_task.example, threads=1)
    assert digits_task.evaluate(deployed)["score"] == pytest.approx(m.score, abs=1e-9)
    assert recipe.backend == m.backend

    # A damaged incumbent (a crash mid-write, a bad disk) is refused with the reason, and the best rebuilt
    # from its recipe: the resumed run has all its trials, so only the end runs again.
    (tmp_path / "incumbent" / sk.io.WEIGHTS).write_bytes(b"\0" * 128)
    with caplog.at_level(logging.WARNING, logger="slimkit.search"):
        again = optimize(digits_task, target, trials=4, out=tmp_path, technique_names=["magnitude", "int8"],
                         progress=False, report=False, resume=True)
    assert again.best.number == result.best.number and again.best_source == "replayed"
    assert any(f"the saved incumbent in {tmp_path.resolve() / 'incumbent'} cannot be used" in r.getMessage() and
               f"rebuilding trial {again.best.number} by replaying" in r.getMessage() for r in caplog.records)
    assert torch.equal(sk.load(tmp_path / "best")(x), replayed(x))


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


@pytest.mark.parametrize("terminal", [True, False])
def test_why_the_search_stopped_is_said_on_a_terminal_and_in_a_log(terminal, monkeypatch, capsys):
    from slimkit.search.trial_progress import TrialProgress

    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    if terminal:
        monkeypatch.setenv("FORCE_COLOR", "1")
        monkeypatch.setenv("TTY_COMPATIBLE", "1")
    line = "search stopped: time budget reached: 3 of 30 trials finished in 290 s of 300 s [x]"
    with TrialProgress(30) as bar:
        assert bar._progress.console.is_terminal is terminal
        bar.say(line)
    assert line in capsys.readouterr().out  # plain text, brackets and all, above a live bar or in a log
