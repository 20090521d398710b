"""The latency lookup table: its error on architectures the fit never saw is measured and bounded."""

from __future__ import annotations

import random

import pytest

from slimkit.nas import CNNSpace, LatencyPredictor, layer_keys, measure_archs


def test_layer_keys_cover_every_layer(mnist_task):
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    keys = layer_keys(space.base)
    assert len(keys) == len(mnist_task.model)  # one key per module of the Sequential
    assert keys[0] == ("conv", 1, 16, 3, 28) and keys[4] == ("conv", 16, 32, 3, 14)


@pytest.mark.slow
def test_predictor_error_on_held_out_architectures(mnist_task, one_thread):
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    rng = random.Random(0)
    archs = list(dict.fromkeys(space.sample(rng) for _ in range(20)))[:12]
    table = LatencyPredictor(batch=64).measure(archs, rounds=3, min_time_s=0.01)
    assert all(layer in table.table.costs for a in archs for layer in layer_keys(a))  # one timing per distinct layer
    measured = measure_archs(archs, batch=64, rounds=3, min_time_s=0.03)
    table.fit(archs[:6], measured[:6])
    err = table.error(archs[6:], measured[6:])
    assert err["n"] == 6
    # 10% is the benchmark's target (batch 256, more rounds); tests share two cores, so the bound is looser.
    assert err["mean_rel_error"] <= 0.3
    assert (table.coef >= 0).all() and table.coef[0] > 0  # non-negative least squares
