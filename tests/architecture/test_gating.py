"""A small/large cascade routed by the small model's confidence: exact extremes, calibrated drop on mnist."""

from __future__ import annotations

import dataclasses

import torch

from slimkit.architecture import Cascade, calibrate, evaluate_routed
from slimkit.train import finetune
from slimkit.zoo.mnist import build_model


def test_extremes_and_mixed_routing(mnist_task):
    torch.manual_seed(0)
    small = build_model(width=4, hidden=32).eval()
    x = mnist_task.eval[0][0][0]
    cascade = Cascade(small, mnist_task.model, threshold=1.0)
    with torch.inference_mode():
        assert torch.equal(cascade(x), mnist_task.model(x))
        cascade.set_thresholds([0.0])
        assert torch.equal(cascade(x), small(x))
        assert (cascade.last_exits == 0).all()
        cascade.set_thresholds([float(small(x).softmax(-1).amax(-1).median())])  # half the rows each way
        mixed = cascade(x)
        rows = cascade.last_exits
        both = torch.stack([small(x), mnist_task.model(x)])  # (2, B, classes)
    assert 0 < rows.sum() < x.shape[0]
    assert (mixed - both[rows, torch.arange(x.shape[0])]).abs().max().item() <= 1e-5


def test_calibrated_cascade_on_mnist(mnist_task, one_thread):
    torch.manual_seed(0)
    small = build_model(width=4, hidden=32)
    finetune(small, dataclasses.replace(mnist_task, train=mnist_task.train[:-10]), steps=300, lr=3e-3, progress=False)
    cascade = Cascade(small.eval(), mnist_task.model)
    holdout = mnist_task.train[-10:]  # unseen by the small model, whose confidence decides
    calibrate(cascade, holdout, max_drop=0.005, margin=0.002)
    report = evaluate_routed(cascade, mnist_task.eval, repeats=1)
    assert mnist_task.evaluate()["score"] - report["accuracy"] <= 0.01
    assert report["exit_fraction"][0] >= 0.5  # the small model answers most digits alone
