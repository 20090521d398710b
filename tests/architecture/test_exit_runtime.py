"""Early exits on ONNX Runtime: same routing and logits as the eager model, calibratable on its own outputs."""

from __future__ import annotations

import pytest
import torch

import slimkit as sk
from slimkit.architecture import EarlyExitConfig, calibrate, evaluate_routed
from slimkit.architecture.exit_runtime import build_exits


@pytest.fixture(scope="module")
def exits(mnist_task):
    torch.set_num_threads(1)
    try:
        ee = sk.apply(mnist_task.model, EarlyExitConfig(steps=100), mnist_task)
    finally:
        torch.set_num_threads(2)
    return ee, build_exits(ee, mnist_task.example, threads=1)


def test_extremes_match_the_eager_model(exits, mnist_task):
    ee, ort_ee = exits
    x = mnist_task.eval[0][0][0]  # (256, 1, 28, 28)
    with torch.inference_mode():
        full = mnist_task.model(x)
        ort_ee.set_thresholds([1.0, 1.0])
        assert (ort_ee(x) - full).abs().max().item() <= 1e-4  # float kernels differ in rounding only
        assert (ort_ee.last_exits == 2).all()
        ort_ee.set_thresholds([0.0, 0.0])
        first = ee.heads[0](ee.blocks[0](x))
        assert (ort_ee(x) - first).abs().max().item() <= 1e-4
        assert (ort_ee.last_exits == 0).all()


def test_mixed_routing_takes_each_row_from_its_exit(exits, mnist_task):
    ee, ort_ee = exits
    x = mnist_task.eval[1][0][0]
    with torch.inference_mode():
        every = torch.stack(ee.exit_logits(x))  # (E, B, classes)
        conf = every[:2].softmax(-1).amax(-1)  # (2, B)
        ort_ee.set_thresholds([float(conf[0].quantile(0.6)), float(conf[1].quantile(0.5))])
        routed = ort_ee(x)
    exits_ = ort_ee.last_exits
    assert len(set(exits_.tolist())) == 3
    assert (routed - every[exits_, torch.arange(x.shape[0])]).abs().max().item() <= 1e-4


def test_costs_grow_by_exit_and_calibration_on_the_runtime(exits, mnist_task):
    _, ort_ee = exits
    costs = ort_ee.exit_costs(mnist_task.eval[0][0][0], rounds=3)
    assert len(costs) == 3 and 0 < costs[0] < costs[1] < costs[2]
    held_out = mnist_task.train[-10:]
    ort_ee.set_thresholds([1.0, 1.0])
    full = evaluate_routed(ort_ee, held_out, repeats=1)["accuracy"]  # the last exit alone
    thresholds = calibrate(ort_ee, held_out, max_drop=0.0, costs=costs)
    assert ort_ee.thresholds.tolist() == pytest.approx(thresholds)
    report = evaluate_routed(ort_ee, held_out, repeats=1)
    assert report["accuracy"] >= full - 1e-9  # no loss on the data it was calibrated on
    assert report["exit_fraction"][0] >= 0.3  # and most easy digits still leave early


def test_unknown_backend_is_a_one_line_error(exits, mnist_task):
    with pytest.raises(sk.SlimkitError, match="not known"):
        build_exits(exits[0], mnist_task.example, "tensorrt")
