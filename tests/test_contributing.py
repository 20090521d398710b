"""CONTRIBUTING.md's promise, kept: a technique declared in one file (this one) is reachable from the
recipe, the search, the CLI and the report without touching any other file."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import optuna
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from slimkit.cli import app
from slimkit.core.config import BaseConfig, technique
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record, last_record
from slimkit.core.registry import SearchContext, remove_technique, searchable
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.pipeline.recipe import Recipe
from slimkit.search.optimize import suggest_pipeline

runner = CliRunner()


@pytest.fixture
def halve():
    """The toy technique, registered for one test and forgotten after it (the search must not see it elsewhere)."""

    @technique("toy.Halve", stage="prune", search="halve")
    @dataclasses.dataclass(frozen=True)
    class Halve(BaseConfig):
        """Scale every Linear weight by ``factor``."""

        factor: float = 0.5

        def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            with torch.no_grad():
                for n in names:
                    model.get_submodule(n).weight.mul_(self.factor)
            add_record(model, StepRecord(self.type_name, self.to_dict()))
            return model

        @classmethod
        def suggest(cls, trial: Any, ctx: SearchContext) -> BaseConfig:
            return cls(factor=trial.suggest_float("halve.factor", 0.25, 1.0))

        @classmethod
        def presets(cls) -> dict[str, BaseConfig]:
            return {"toy-halve": cls()}

        @classmethod
        def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
            report.heading(f"Toy section: factor {record.config['factor']}")

    yield Halve
    remove_technique("toy.Halve")


def test_a_technique_from_one_file_reaches_recipe_search_cli_and_report(halve, digits_task, tmp_path):
    # recipe: written, read back, replayed
    recipe = Recipe.from_yaml(Recipe(steps=[halve(factor=0.25)], task="digits").to_yaml())
    model = recipe.replay(digits_task)
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    original = next(m for m in digits_task.model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(first.weight, original.weight * 0.25)
    assert last_record(model).technique == "toy.Halve"
    # search: offered in its stage, its knobs drawn from the trial
    assert [t.name for t in searchable(["halve"])] == ["toy.Halve"]
    ctx = SearchContext(task=digits_task, target=Target(max_drop=0.01), baseline={})
    trial = optuna.trial.FixedTrial({"stage.prune": "halve", "halve.factor": 0.5, "stage.factorize": "none",
                                     "stage.nas": "none", "stage.fuse": "none", "stage.quantize": "none"})
    assert suggest_pipeline(trial, ctx, searchable()) == [halve(factor=0.5)]
    # CLI: listed, applied by type name and by preset, each run writing a recipe and a report with its section
    listed = runner.invoke(app, ["techniques"])
    assert listed.exit_code == 0 and "toy.Halve" in listed.output and "toy-halve" in listed.output
    for step, factor in (("toy.Halve factor=0.75", 0.75), ("toy-halve", 0.5)):
        out = tmp_path / str(factor)
        result = runner.invoke(app, ["apply", "--step", step, "--task", "digits", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert Recipe.load(out / "recipe.yaml").steps == [halve(factor=factor)]
        assert f"Toy section: factor {factor}" in (out / "report.html").read_text()
        assert json.loads((out / "report.json").read_text())["steps"][0]["technique"] == "toy.Halve"
