"""The optimizer with a deterministic fake measurer: constraints, Pareto front, best, "nothing fits"."""

from __future__ import annotations

from typing import Any, Sequence

import pytest

import slimkit as sk
from slimkit.core.registry import searchable as techniques
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.optimize import context_for, optimize
from slimkit.search.pareto import TrialRecord, pareto_front, pick_best

BASE_MB, BASE_MS, BASE_SCORE = 1.0, 10.0, 0.95


class FakeMeasurer:
    """Size and latency shrink with pruning/quantization; quality falls with both. No randomness."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, configs: Sequence[Any], early_stop: bool = True) -> tuple[TrialMeasurement, None]:
        self.calls.append([c.type_name for c in configs])
        size, ms, score = BASE_MB, BASE_MS, BASE_SCORE
        for c in configs:
            if c.type_name == "prune.Channels":
                keep = c.macs_ratio if c.macs_ratio is not None else (1 - c.amount) ** 2
                size *= keep
                ms *= keep
                score -= 0.2 * (1 - keep) ** 2
            elif c.type_name == "quantize.Int8":
                size *= 0.25
                ms *= 0.5
                score -= 0.002
            elif c.type_name == "quantize.WeightOnly":
                size *= 0.25 if c.bits == 8 else 0.15
                score -= 0.001 if c.bits == 8 else 0.02
        m = TrialMeasurement(size_mb=size, latency_ms=ms, score=score, drop=BASE_SCORE - score, params=int(size * 1e6))
        return m, None


@pytest.fixture
def run(digits_task, tmp_path):
    def go(target: sk.Target, trials: int = 12, **kw: Any):
        return optimize(digits_task, target, trials=trials, out=tmp_path / "run", measurer=FakeMeasurer(),
                        technique_names=["channels", "int8", "weight_only"], progress=False, report=False, **kw)
    return go


def test_best_fits_and_is_the_best_feasible_metric(run):
    target = sk.Target(max_size_mb=0.26, max_drop=0.01)
    result = run(target, trials=15)
    assert len(result.trials) == 15
    assert result.best is not None and result.best.feasible
    m = result.best.measured
    assert m.size_mb <= 0.26 and m.drop <= 0.01
    feasible = [t for t in result.trials if t.feasible]
    assert m.drop == min(t.measured.drop for t in feasible)
    # every constraint vector is measured - limit, <= 0 exactly when it fits
    for t in result.trials:
        assert t.constraints == pytest.approx([t.measured.size_mb - 0.26, t.measured.drop - 0.01])
    # a measurer that hands back no model leaves nothing to save: best/ is rebuilt from the recipe
    assert result.best_source == "replayed" and result.stopped == "trials done: 15 of 15 finished"


def test_informed_first_trial_fits_a_quarter_size_target(run):
    result = run(sk.Target(max_size_mb=0.3, max_drop=0.01), trials=3)
    first = min(result.trials, key=lambda t: t.number)
    assert [s["type"] for s in first.recipe] == ["quantize.Int8"]
    assert first.feasible and result.first_feasible["trials"] == 1


def test_a_spent_time_budget_is_the_reason_the_search_stopped(run):
    import time

    spent = time.monotonic() - 60.0  # the command started a minute ago: a 30 s budget is spent before any trial
    result = run(sk.Target(max_drop=0.01), trials=3, time_budget=30.0, budget_start=spent)
    assert result.trials == [] and result.best is None
    assert result.stopped.startswith("time budget reached: 0 of 3 trials finished in ")
    assert " s of 30 s " in result.stopped


def test_nothing_fits_gives_closest_margins_and_a_hint(run):
    result = run(sk.Target(max_size_mb=0.001, max_drop=0.01), trials=8)
    assert result.best is None
    assert len(result.closest) == 3 and all(c.constraints[0] > 0 for c in result.closest)
    smallest = min(t.measured.size_mb for t in result.trials if t.measured.size_mb is not None)
    assert any(h.startswith("size:") and f"{smallest:.4g} MB" in h for h in result.hints)


def test_pareto_front_is_non_dominated():
    def rec(n: int, drop: float, mb: float, ms: float) -> TrialRecord:
        return TrialRecord(n, [], TrialMeasurement(size_mb=mb, latency_ms=ms, score=1 - drop, drop=drop), [0.0])

    records = [rec(0, 0.01, 1.0, 1.0), rec(1, 0.02, 0.5, 1.0), rec(2, 0.03, 0.6, 1.2), rec(3, 0.0, 2.0, 2.0)]
    assert [r.number for r in pareto_front(records)] == [1, 0, 3]  # 2 is beaten by 1 on every axis
    assert pick_best(records).number == 3  # feasible, best metric


def test_invalid_inputs_are_one_line_errors(run, digits_task):
    with pytest.raises(sk.SlimkitError, match="trials=0"):
        run(sk.Target(max_drop=0.01), trials=0)
    with pytest.raises(sk.SlimkitError, match="unknown strategy"):
        run(sk.Target(max_drop=0.01), strategy="grid")
    with pytest.raises(sk.SlimkitError, match="unknown technique"):
        optimize(digits_task, sk.Target(max_drop=0.01), technique_names=["telepathy"], measurer=FakeMeasurer(),
                 progress=False, report=False)
    with pytest.raises(sk.SlimkitError, match="max_size_mb=-1"):
        sk.Target(max_size_mb=-1)
    with pytest.raises(sk.SlimkitError, match="device"):
        sk.Target(device="tpu")


def test_resume_refuses_and_requires_correctly(run):
    run(sk.Target(max_drop=0.01), trials=2)
    with pytest.raises(sk.SlimkitError, match="already exists"):
        run(sk.Target(max_drop=0.01), trials=2)
    result = run(sk.Target(max_drop=0.01), trials=4, resume=True)
    assert len(result.trials) == 4  # two more, not four more


def test_max_techniques_limits_each_pipeline(digits_task, tmp_path):
    import optuna

    from slimkit.search.optimize import suggest_pipeline

    ctx = context_for(digits_task, sk.Target(max_size_mb=0.01, max_drop=0.05), TrialMeasurement(
        size_mb=0.16, latency_ms=0.3, score=0.97, params=40000), {}, max_techniques=1)
    techs = techniques(["channels", "finetune", "int8"])
    study = optuna.create_study(directions=["minimize"])
    for params in ({"stage.prune": "channels", "channels.by": "macs", "channels.macs_ratio": 0.5,
                    "channels.importance": "l2",
                    "stage.recover": "finetune", "finetune.steps": 100, "stage.quantize": "int8"},
                   {"stage.prune": "none", "stage.quantize": "int8", "int8.activations": "dynamic"}):
        study.enqueue_trial(params)
        trial = study.ask()
        types = [c.to_dict()["type"] for c in suggest_pipeline(trial, ctx, techs)]
        study.tell(trial, 0.0)
        # pruning keeps its recovery training, but no second technique joins it
        assert types in (["prune.Channels", "train.Finetune"], ["quantize.Int8"]), types
    with pytest.raises(sk.SlimkitError, match="max_techniques=0 is invalid"):
        optimize(digits_task, sk.Target(max_drop=0.05), trials=1, out=tmp_path, max_techniques=0)


def test_what_is_known_before_training_ends_a_trial_before_any_training():
    from slimkit.search.evaluate import RuntimeMeasurer
    from tests.models import cnn, sequence, tiny_task

    task = tiny_task(cnn)
    size_mb = sk.measure.artifact_size(task.model) / 1e6
    measure = RuntimeMeasurer(task, sk.Target(max_size_mb=size_mb * 0.5, max_drop=0.01))
    m, model = measure([sk.prune.Channels(amount=0.1, round_to=None), sk.train.Finetune(steps=50)])
    assert m.stopped_at == "size" and m.size_mb > size_mb * 0.5 and model is None
    assert m.latency_ms is None and m.score is None  # neither trained nor timed nor scored
    seq = tiny_task(sequence)
    nothing = sk.prune.Channels(amount=0.5, ignored=("conv", "lstm"))  # what is left feeds the output directly
    m, model = RuntimeMeasurer(seq, sk.Target(max_drop=0.01))([nothing, sk.train.Finetune(steps=50)])
    assert model is None and "prune.Channels removed nothing (" in m.error and "train.Finetune" not in m.timings


def test_a_pipeline_that_hits_a_bug_is_recorded_not_fatal():
    from slimkit.search.evaluate import RuntimeMeasurer
    from tests.models import mlp, tiny_task

    task = tiny_task(mlp)

    def broken_loss(outputs, labels):
        raise RuntimeError("boom\nsecond line")

    task.loss = broken_loss
    m, model = RuntimeMeasurer(task, sk.Target(max_drop=0.01))([sk.prune.Magnitude(amount=0.3),
                                                               sk.train.Finetune(steps=2)])
    assert model is None and m.error == "train.Finetune: RuntimeError: boom (a bug: please report it)"
    assert "prune.Magnitude" in m.timings
