"""The image tasks: real data, fixed splits, deterministic training, accuracy >= 97%."""

import sys

import pytest
import torch

from slimkit import SlimkitError, zoo
from slimkit.zoo import _vision, digits, mnist


def test_digits_accuracy_and_splits(digits_task):
    assert digits_task.evaluate()["score"] >= 0.97
    assert dict(digits_task.splits) == digits.SPLITS
    n_test = sum(y.numel() for _, y in digits_task.eval)
    assert n_test == 360
    labels = torch.cat([y for _, y in digits_task.eval])
    assert torch.bincount(labels).tolist() == [36] * 10


@pytest.mark.slow
def test_mnist_accuracy_and_splits(mnist_task):
    assert mnist_task.evaluate()["score"] >= 0.97
    assert dict(mnist_task.splits) == mnist.SPLITS
    assert sum(x[0].shape[0] for x in mnist_task.calib) == 512
    assert mnist_task.example[0].shape == (1, 1, 28, 28)


def test_splits_are_disjoint_and_stratified():
    x, y = digits.load_data()
    train, test = _vision.stratified_split(y, 36, seed=0)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert train.numel() + test.numel() == 1797
    again, _ = _vision.stratified_split(y, 36, seed=0)
    assert torch.equal(train, again)


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path))
    x, y = digits.load_data()
    cfg = {"epochs": 2, "lr": 3e-3, "batch_size": 64, "weight_decay": 0.0, "seed": 7, "shift": 1}
    a, info = _vision.trained_model("digits", digits.build_model, x[:400], y[:400], cfg, progress=False)
    entries = [e for e in tmp_path.iterdir() if not e.name.startswith(".")]  # the artifact's lock and versions are hidden
    assert len(entries) == 1 and info["train_config"] == cfg
    b, _ = _vision.trained_model("digits", digits.build_model, x[:400], y[:400], cfg, progress=False)  # from cache
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    # Retrain from scratch in a second cache: the same seed gives the same weights.
    monkeypatch.setenv("SLIMKIT_CACHE", str(tmp_path / "second"))
    c, _ = _vision.trained_model("digits", digits.build_model, x[:400], y[:400], cfg, progress=False)
    assert all(torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_random_shift_moves_pixels_without_changing_mass():
    img = torch.zeros(1, 1, 8, 8)
    img[0, 0, 4, 4] = 1.0
    out = _vision.random_shift(2)(img.repeat(50, 1, 1, 1), torch.Generator().manual_seed(0))
    assert out.shape == (50, 1, 8, 8)
    assert torch.all(out.sum(dim=(1, 2, 3)) == 1.0)  # the dot moves at most 2 px: it stays inside
    assert len({tuple(o.nonzero()[0].tolist()) for o in out}) > 5


def test_plugin_task_and_unknown_names(tmp_path, monkeypatch, digits_task):
    (tmp_path / "my_tasks.py").write_text(
        "from slimkit import zoo\n"
        "def make_task():\n"
        "    t = zoo.load('digits')\n"
        "    t.name = 'mine'\n"
        "    return t\n"
        "def not_a_task():\n"
        "    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = zoo.load("my_tasks:make_task")
    assert task.name == "mine" and task.evaluate()["score"] >= 0.97
    with pytest.raises(SlimkitError, match="returned int, not a slimkit.Task"):
        zoo.load("my_tasks:not_a_task")
    with pytest.raises(SlimkitError, match="has no function 'missing'"):
        zoo.load("my_tasks:missing")
    with pytest.raises(SlimkitError, match="cannot import 'no_such_pkg.mod'"):
        zoo.load("no_such_pkg.mod:make")
    with pytest.raises(SlimkitError, match="unknown task 'cifar'"):
        zoo.load("cifar")
    sys.modules.pop("my_tasks", None)
