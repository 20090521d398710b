"""Early exits on the mnist CNN: exact at the extremes, per-sample routing, calibrated drop on the test split."""

from __future__ import annotations

import pytest
import torch

import slimkit as sk
from slimkit.architecture import EarlyExit, EarlyExitConfig, attach_exits, evaluate_routed


@pytest.fixture(scope="module")
def trained_exits(mnist_task):
    torch.set_num_threads(1)
    try:
        return sk.apply(mnist_task.model, EarlyExitConfig(steps=150, max_drop=0.005, margin=0.002), mnist_task)
    finally:
        torch.set_num_threads(2)


def test_threshold_one_is_the_full_model_and_zero_always_exits_first(mnist_task):
    ee = attach_exits(mnist_task.model, mnist_task.example)
    assert [len(b) for b in ee.blocks] == [4, 4, 8]  # exits after the first two pooling layers
    x = mnist_task.eval[0][0][0]  # (256, 1, 28, 28)
    with torch.inference_mode():
        full = mnist_task.model(x)
        assert torch.equal(ee(x), full)
        assert (ee.last_exits == 2).all()
        ee.set_thresholds([0.0, 0.0])
        first = ee.heads[0](ee.blocks[0](x))
        assert torch.equal(ee(x), first)
        assert (ee.last_exits == 0).all()


def test_rows_leave_at_their_own_exit_inside_a_batch(trained_exits, mnist_task):
    x = mnist_task.eval[1][0][0]
    with torch.inference_mode():
        routed = trained_exits(x)
        exits = trained_exits.last_exits
        every = torch.stack(trained_exits.exit_logits(x))  # (E, B, classes)
    assert len(set(exits.tolist())) >= 2  # a real mix of exits in one batch
    expected = every[exits, torch.arange(x.shape[0])]
    assert (routed - expected).abs().max().item() <= 1e-5


def test_calibrated_exits_keep_accuracy_and_leave_early(trained_exits, mnist_task):
    assert isinstance(trained_exits, EarlyExit) and trained_exits.freeze_backbone
    base = mnist_task.evaluate()["score"]
    report = evaluate_routed(trained_exits, mnist_task.eval, repeats=1)
    assert base - report["accuracy"] <= 0.01  # calibrated for 0.5 pt on held-out data; 1,000 test images
    assert sum(report["exit_fraction"]) == pytest.approx(1.0)
    assert report["exit_fraction"][0] >= 0.3
    # the frozen backbone is untouched: the final exit still equals the original model
    x = mnist_task.eval[0][0][0]
    with torch.inference_mode():
        assert torch.equal(trained_exits.exit_logits(x)[-1], mnist_task.model(x))


def test_saved_early_exit_reloads_with_identical_outputs(trained_exits, mnist_task, tmp_path):
    sk.save(trained_exits, tmp_path / "ee")
    back = sk.load(tmp_path / "ee")  # rebuilt by the registered "early_exit" builder, no model= needed
    assert isinstance(back, EarlyExit)
    assert torch.equal(back.thresholds, trained_exits.thresholds)
    x = mnist_task.eval[1][0][0]
    with torch.inference_mode():
        assert torch.equal(back(x), trained_exits(x))
        assert torch.equal(back.last_exits, trained_exits.last_exits)
        for a, b in zip(back.exit_logits(x), trained_exits.exit_logits(x)):
            assert torch.equal(a, b)


def test_heads_are_small_and_pool_to_a_fixed_grid(mnist_task):
    ee = attach_exits(mnist_task.model, mnist_task.example, hidden=0)
    # (B, 16, 14, 14) -> AvgPool 3 -> (B, 16, 4, 4) -> Linear(256, 10)
    assert sum(p.numel() for p in ee.heads[0].parameters()) == 16 * 4 * 4 * 10 + 10
    # (B, 32, 7, 7) -> AvgPool 1 -> Linear(1568, 10)
    assert sum(p.numel() for p in ee.heads[1].parameters()) == 32 * 7 * 7 * 10 + 10


def test_bad_exit_positions_are_one_line_errors(mnist_task):
    with pytest.raises(sk.SlimkitError, match="do not split"):
        attach_exits(mnist_task.model, mnist_task.example, after=[15])
    with pytest.raises(sk.SlimkitError, match="nn.Sequential"):
        attach_exits(torch.nn.Module(), mnist_task.example)
