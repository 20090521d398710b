"""While nothing fits, the closest miss is stepped toward the target along its strength knobs."""

from __future__ import annotations

import optuna

import slimkit as sk
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.pareto import TrialRecord
from slimkit.search.refine import direction, near, neighbour, step_closest

TARGET = sk.Target(max_size_mb=0.02, max_drop=0.01)
NAMES = TARGET.names()
PARAMS = {"stage.prune": "channels", "channels.by": "width", "channels.amount": 0.55, "stage.recover": "finetune",
          "finetune.steps": 200, "stage.quantize": "mixed", "mixed.widths": "narrowest"}


def _record(number: int, size: float, drop: float | None, params: dict = PARAMS) -> TrialRecord:
    m = TrialMeasurement(size_mb=size, drop=drop, score=None if drop is None else 0.99 - drop)
    return TrialRecord(number, [], m, TARGET.constraints(m.measurement()), dict(params))


def test_direction_follows_the_limit_missed():
    assert direction(_record(0, 0.016, 0.012), NAMES) == -1      # fits in bytes, loses too much: gentler
    assert direction(_record(1, 0.030, None), NAMES) == 1        # stopped at bytes, quality unknown: stronger
    assert direction(_record(2, 0.030, 0.002), NAMES) == 1
    assert direction(_record(3, 0.030, 0.05), NAMES) == 0        # both missed: no clear way


def test_neighbour_steps_strength_and_recovery_within_bounds():
    gentler = neighbour(PARAMS, -1, {"finetune.steps": 400})
    assert gentler["channels.amount"] == 0.5 and gentler["finetune.steps"] == 400
    stronger = neighbour(PARAMS, 1, {"finetune.steps": 400})
    assert stronger["channels.amount"] == 0.6 and stronger["finetune.steps"] == 200
    at_edge = {**PARAMS, "channels.amount": 0.8}
    assert neighbour(at_edge, 1, {}) is None                      # nothing can move: no proposal
    assert neighbour({"stage.quantize": "int8"}, -1, {}) is None


def test_step_closest_queues_one_neighbour_until_something_fits():
    study = optuna.create_study(directions=["minimize"])
    records = [_record(0, 0.016, 0.012), _record(1, 0.05, None, {**PARAMS, "channels.amount": 0.2})]
    proposal = step_closest(study, TARGET, records)
    assert proposal is not None and proposal["channels.amount"] == 0.5   # from the closest miss (#0)
    assert step_closest(study, TARGET, records) is None                  # one waits already: nothing more
    study.ask()                                                          # the queued one is taken
    assert step_closest(study, TARGET, records + [_record(2, 0.018, 0.004)]) is None  # a fit: stop stepping


def test_only_near_misses_are_stepped():
    assert near(_record(0, 0.016, 0.012), TARGET) and near(_record(1, 0.029, None), TARGET)
    assert not near(_record(2, 0.3, None), TARGET)               # 15x over the bytes: the sampler's job
    assert not near(_record(3, 0.016, 0.2), TARGET)              # 20x the allowed drop
    study = optuna.create_study(directions=["minimize"])
    assert step_closest(study, TARGET, [_record(4, 0.3, None)]) is None
