"""A candidate that measures NaN or raises is recorded with its reason and the search goes on; an
original that cannot be measured stops the search with one line (there is nothing to compare with)."""

from __future__ import annotations

import json

import pytest
import torch.nn as nn

import slimkit as sk
from slimkit.core.task import accuracy
from slimkit.search.optimize import optimize
from tests.models import mlp, tiny_task

TRIALS = 4


def _pruned(run) -> bool:
    return isinstance(run, nn.Module) and any(bool((p == 0).any()) for p in run.parameters())


def picky_metric(run, batches) -> float:
    """The original scores; a pruned model (zeros among its weights) scores NaN; anything not a torch
    module (an onnxruntime session: int8) makes the metric itself raise."""
    if not isinstance(run, nn.Module):
        raise RuntimeError("this metric reads torch modules only")
    return float("nan") if _pruned(run) else accuracy(run, batches)


MEASURING = "measuring (size, runtime build, latency, metric): "
NAN = MEASURING + "task 'mlp': metric is NaN — check the model for NaN weights or inputs"
RAISED = MEASURING + "RuntimeError: this metric reads torch modules only (a bug: please report it)"


def test_nan_and_raising_candidates_are_recorded_and_the_search_goes_on(tmp_path, one_thread):
    task = tiny_task(mlp)
    task.metric = picky_metric
    result = optimize(task, sk.Target(max_drop=0.05, threads=1), trials=TRIALS, out=tmp_path, progress=False,
                      technique_names=["magnitude", "int8"], sensitivity=False)
    assert len(result.trials) == TRIALS
    for t in result.trials:
        kinds = [s["type"] for s in t.recipe]
        expected = None if not kinds else NAN if kinds == ["prune.Magnitude"] else RAISED
        assert t.measured.error == expected, kinds
        assert t.feasible == (expected is None)
    assert {NAN, RAISED} <= {t.measured.error for t in result.trials}
    # the reasons reach result.json, and the report's table of trials
    saved = json.loads((tmp_path / "result.json").read_text())
    assert [t["measured"]["error"] for t in saved["trials"]] == [t.measured.error for t in result.trials]
    html = (tmp_path / "report.html").read_text()
    assert RAISED in html and "metric is NaN — check the model for NaN weights or inputs" in html


def test_an_original_that_measures_nan_stops_the_search_with_one_line(tmp_path):
    task = tiny_task(mlp)
    task.metric = lambda run, batches: float("nan")
    with pytest.raises(sk.SlimkitError) as caught:
        optimize(task, sk.Target(max_drop=0.05, threads=1), trials=2, out=tmp_path, progress=False,
                 technique_names=["magnitude"], sensitivity=False, report=False)
    assert str(caught.value) == (
        "the original model could not be measured (measuring (size, runtime build, latency, metric): task 'mlp': "
        "metric is NaN — check the model for NaN weights or inputs) — the search compares every candidate with "
        "it: fix the model or the task's metric")
    assert "\n" not in str(caught.value)


class RaisingMeasurer:
    """A caller's own measurer with a bug for one pipeline (any exception type), NaN for another."""

    def __call__(self, configs, early_stop: bool = True):
        from slimkit.search.evaluate import TrialMeasurement

        kinds = [c.type_name for c in configs]
        if kinds == ["prune.Magnitude"]:
            raise KeyError("missing layer")
        score = float("nan") if kinds else 0.9
        return TrialMeasurement(size_mb=1.0, latency_ms=1.0, score=score, drop=0.9 - score), None


def test_a_measurer_that_raises_or_returns_nan_is_recorded(tmp_path, digits_task):
    from slimkit.search.optimize import measure_safely

    m = measure_safely(RaisingMeasurer(), [sk.prune.Magnitude(amount=0.5)])
    assert m.error == "measuring: KeyError: 'missing layer' (a bug: please report it)" and m.score is None
    m = measure_safely(RaisingMeasurer(), [sk.quantize.Int8()])
    assert m.error == "measuring: score, drop came out NaN" and m.score is None and m.drop is None
    result = optimize(digits_task, sk.Target(max_drop=0.05), trials=3, out=tmp_path, progress=False,
                      measurer=RaisingMeasurer(), technique_names=["magnitude", "int8"], report=False)
    assert len(result.trials) == 3
    for t in result.trials:
        kinds = [s["type"] for s in t.recipe]
        assert t.measured.error == (None if not kinds else "measuring: KeyError: 'missing layer' (a bug: please "
                                    "report it)" if kinds == ["prune.Magnitude"] else "measuring: score, drop came "
                                    "out NaN"), kinds
    assert "NaN," not in (tmp_path / "result.json").read_text()  # no NaN number: result.json stays strict JSON
