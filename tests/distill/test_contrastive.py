"""SimCSE plain fine-tuning: the InfoNCE value, dropout views, training lowers the loss, bad input."""

import math

import pytest
import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.distill import SimCSELoss, contrastive_loss, simcse_finetune


def test_contrastive_loss_matches_the_closed_form():
    e = torch.eye(6, dtype=torch.float64)  # (B=6, D=6) orthonormal rows: own twin has cosine 1, every other row 0
    tau = 0.1
    expected = math.log(1 + 5 * math.exp(-1 / tau))  # -log(e^{1/τ} / (e^{1/τ} + (B-1)·e^0))
    assert contrastive_loss(e, e, tau).item() == pytest.approx(expected, rel=1e-6)
    assert contrastive_loss(e, e.roll(1, 0), tau).item() == pytest.approx(1 / tau + math.log(1 + 5 * math.exp(-1 / tau)),
                                                                          rel=1e-6)  # every twin is the wrong row


def encoder(dropout: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 16))


def digits_embedding_task(digits_task, model: nn.Module) -> Task:
    """The digits images as unlabelled inputs for an embedding model (B, 64) -> (B, 16)."""
    train = [((x.flatten(1),), None) for (x,), _ in digits_task.train]
    return Task(name="digits-embed", model=model, example=(train[0][0][0][:2],),
                metric=lambda run, data: {"score": 0.0}, eval=None, train=train)


def test_two_passes_differ_only_by_dropout(digits_task):
    task = digits_embedding_task(digits_task, encoder(0.1))
    x = task.train[0][0][0]
    model = task.model.train()
    loss = SimCSELoss(0.05)(model, (x,), None)
    assert 0.0 < loss.item() < math.log(x.shape[0]) + 1 / 0.05  # finite, and the two views are not identical
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_simcse_lowers_the_loss_on_real_images(digits_task, one_thread):
    task = digits_embedding_task(digits_task, encoder(0.1))
    result = simcse_finetune(task.model, task, steps=60, lr=3e-3, progress=False)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)  # measured: 3.1 -> 0.4 (batch 64: chance is log 64 = 4.2)
    assert not task.model.training


def test_bad_input_gives_one_line_errors(digits_task):
    with pytest.raises(SlimkitError, match="needs dropout"):
        simcse_finetune(encoder(0.0), digits_embedding_task(digits_task, encoder(0.0)), steps=1, lr=1e-3,
                        progress=False)
    with pytest.raises(SlimkitError, match="temperature"):
        SimCSELoss(0.0)
    with pytest.raises(SlimkitError, match="training inputs"):
        simcse_finetune(encoder(0.1), None, steps=1, lr=1e-3)
