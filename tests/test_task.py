import pytest
import torch
import torch.nn as nn

from slimkit import SlimkitError, Task
from slimkit.core.task import accuracy


def _batches():
    x = torch.eye(4)
    y = torch.tensor([0, 1, 2, 3])
    return [((x[:2],), y[:2]), ((x[2:],), y[2:])]


def test_accuracy_counts_top1_over_batches():
    identity = nn.Identity()
    assert accuracy(identity, _batches()) == 1.0
    shifted = lambda x: x.roll(1, dims=1)  # noqa: E731  every prediction off by one
    assert accuracy(shifted, _batches()) == 0.0


def test_evaluate_returns_score_and_rejects_nan():
    task = Task(name="t", model=nn.Identity(), example=(torch.eye(4),), metric=accuracy, eval=_batches())
    assert task.evaluate() == {"score": 1.0}
    nan_task = Task(name="n", model=nn.Identity(), example=(torch.eye(4),), metric=lambda run, d: float("nan"), eval=None)
    with pytest.raises(SlimkitError, match="metric is NaN"):
        nan_task.evaluate()


def test_drop_direction_follows_higher_is_better():
    up = Task(name="acc", model=nn.Identity(), example=(torch.zeros(1),), metric=accuracy, eval=None)
    down = Task(name="loss", model=nn.Identity(), example=(torch.zeros(1),), metric=accuracy, eval=None,
                higher_is_better=False)
    assert up.drop(0.9, 0.85) == pytest.approx(0.05)
    assert down.drop(0.2, 0.25) == pytest.approx(0.05)


def test_task_refuses_a_non_module_model():
    with pytest.raises(SlimkitError, match="not a torch nn.Module"):
        Task(name="x", model="model.pt", example=(torch.zeros(1),), metric=accuracy, eval=None)


def test_unwrapped_training_batches_get_an_error_showing_what_was_received_and_expected():
    from slimkit.train.finetune import finetune

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    task = Task(name="mine", model=nn.Linear(4, 3), example=(x,), metric=accuracy, eval=[((x,), y)],
                train=[(x, y)], loss=nn.functional.cross_entropy)  # (x, y): the inputs are not a tuple
    with pytest.raises(SlimkitError) as caught:
        finetune(task.model, task, steps=1, progress=False)
    message = str(caught.value)
    assert "training batch 0 is (Tensor[8, 4], Tensor[8])" in message and "((x,), y)" in message
    assert "\n" not in message
