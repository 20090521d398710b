import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit import prune


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))  # 11,000 weights


def test_cubic_schedule_values_at_known_steps():
    s = dict(final=0.9, initial=0.1, start=200, n=10, every=100)
    assert prune.cubic_sparsity(0, **s) == 0.1
    assert prune.cubic_sparsity(200, **s) == 0.1
    assert prune.cubic_sparsity(300, **s) == pytest.approx(0.9 - 0.8 * 0.9 ** 3)  # 0.3168
    assert prune.cubic_sparsity(700, **s) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)  # 0.8
    assert prune.cubic_sparsity(1200, **s) == 0.9
    assert prune.cubic_sparsity(5000, **s) == 0.9
    with pytest.raises(sk.SlimkitError, match="above final"):
        prune.cubic_sparsity(0, final=0.2, initial=0.5)
    with pytest.raises(sk.SlimkitError, match="not a fraction"):
        prune.cubic_sparsity(0, final=1.0)


class _FakeTraining:
    """Stands in for a fine-tuning loop: moves every weight, then calls after_step."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.step = 0

    def __call__(self, model: nn.Module, steps: int, after_step) -> None:
        self.calls.append(steps)
        for _ in range(steps):
            self.step += 1
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            after_step(model, self.step)


def test_gradual_pruning_follows_the_schedule_and_keeps_masks_between_steps():
    model = _model()
    train = _FakeTraining()
    history = prune.gradual(model, train, final=0.8, n=4, every=5, recover=3)
    expected = [prune.cubic_sparsity(t, final=0.8, n=4, every=5) for t in (0, 5, 10, 15, 20)]
    assert [h[0] for h in history] == [0, 5, 10, 15, 20]
    assert [h[1] for h in history] == pytest.approx([round(e * 11000) / 11000 for e in expected])
    assert train.calls == [5, 5, 5, 5, 3]
    assert prune.global_sparsity(model) == pytest.approx(0.8)  # noise added by "training" was re-masked


def test_cubic_pruner_as_an_after_step_callback_and_one_shot():
    model = _model()
    pruner = prune.CubicPruner(model, final=0.5, n=2, every=3, start=1)
    _FakeTraining()(model, 10, pruner)  # steps 1..10 prune at 1, 4, 7
    assert [h[0] for h in pruner.history] == [1, 4, 7]
    assert pruner.history[-1][1] == pytest.approx(0.5)
    assert prune.global_sparsity(model) == pytest.approx(0.5)
    other = _model()
    history = prune.one_shot(other, 0.3, _FakeTraining(), steps=4, scope="layer")
    assert history == [(0, pytest.approx(0.3)), (4, pytest.approx(0.3))]
