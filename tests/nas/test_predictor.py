"""The latency lookup table: its error on architectures the fit never saw is measured and bounded."""

from __future__ import annotations

import random

import pytest

from slimkit.nas import CNNSpace, LatencyPredictor, layer_keys
from slimkit.measure.latency_table import LeafCost


def test_layer_keys_cover_every_layer(mnist_task):
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    keys = layer_keys(space.base)
    assert len(keys) == len(mnist_task.model)  # one key per module of the Sequential
    assert keys[0] == ("conv", 1, 16, 3, 28) and keys[4] == ("conv", 16, 32, 3, 14)


def test_predictor_fit_recovers_a_known_cost_model_on_held_out_architectures(mnist_task):
    """Layer times and whole-model times are synthetic and exact (a unit test asserts no real timing; the
    predictor's error on real timings is a benchmark: bench/arch.py, BENCHMARKS.md)."""
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    rng = random.Random(0)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(20)))[:12]
    predictor = LatencyPredictor(batch=64)
    for key in dict.fromkeys(k for a in archs for k in layer_keys(a)):  # a fake, deterministic layer cost
        ms = 0.01 * (1 + sum(v for v in key[1:] if isinstance(v, int)) % 17)
        predictor.table.costs[key] = LeafCost((1.0,), ((ms,),))

    def whole_model_ms(arch) -> float:  # convs cost 1.3x their layer times inside a model, the rest 0.8x
        conv = sum(predictor.layer_ms(k) for k in layer_keys(arch) if k[0] == "conv")
        return 1.3 * conv + 0.8 * (predictor.raw_ms(arch) - conv) + 0.05

    measured = [whole_model_ms(a) for a in archs]
    predictor.fit(archs[:6], measured[:6])
    err = predictor.error(archs[6:], measured[6:])
    assert err["n"] == 6 and err["max_rel_error"] < 1e-6
    assert predictor.coef == pytest.approx([1.3, 0.8, 0.05], rel=1e-4)
    few = LatencyPredictor(batch=64)
    few.table = predictor.table
    few.fit(archs[:2], measured[:2])  # under 4 models: the plain sum scaled to the measured total
    assert few.coef[0] == few.coef[1] and few.coef[2] == 0.0
    assert sum(few.predict(a) for a in archs[:2]) == pytest.approx(sum(measured[:2]))
