"""The CNN search space: read from the mnist model, valid samples whose parameter counts match the formula."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.nas import CNNArch, CNNSpace, arch_of, build, param_count


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_space_is_read_from_the_mnist_model(mnist_task):
    arch = arch_of(mnist_task.model, mnist_task.example)
    assert arch == CNNArch((16, 32, 64), (1, 1, 1), (3, 3, 3), 128, in_channels=1, classes=10, input_size=28)
    assert param_count(arch) == params(mnist_task.model) == params(build(arch))
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    assert space.widths(0) == [4, 8, 12, 16] and space.widths(2) == [16, 32, 48, 64]
    assert space.contains(arch)


def test_sampled_architectures_are_valid_models_with_formula_params(mnist_task):
    space = CNNSpace.from_model(mnist_task.model, mnist_task.example)
    rng = random.Random(0)
    x = torch.randn(3, 1, 28, 28)
    seen = set()
    for _ in range(25):
        arch = space.sample(rng)
        seen.add(arch)
        model = build(arch).eval()
        assert space.contains(arch)
        assert params(model) == param_count(arch)
        with torch.inference_mode():
            assert model(x).shape == (3, 10)
        child = space.mutate(arch, rng)
        assert child != arch and space.contains(child)
    assert len(seen) >= 20
    big, small = space.largest(), space.smallest()
    assert param_count(big) == (25 * 16 + 48) + (25 * 16 * 16 + 48) + (25 * 16 * 32 + 96) + (25 * 32 * 32 + 96) \
        + (25 * 32 * 64 + 192) + (25 * 64 * 64 + 192) + 576 * 128 + 128 + 1290
    assert param_count(small) == (9 * 4 + 12) + (9 * 4 * 8 + 24) + (9 * 8 * 16 + 48) + 144 * 32 + 32 + 330


def test_found_model_saves_and_reloads(tmp_path):
    arch = CNNArch((8, 16), (2, 1), (5, 3), 0, in_channels=3, classes=4, input_size=16)
    torch.manual_seed(0)
    model = build(arch).eval()
    assert params(model) == param_count(arch)
    sk.save(model, tmp_path / "nas")
    back = sk.load(tmp_path / "nas")
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(back(x), model(x))


def test_unsupported_models_are_one_line_errors():
    with pytest.raises(sk.SlimkitError, match="cannot read a CNN search space"):
        arch_of(nn.Linear(3, 3), (torch.randn(1, 3),))
    with pytest.raises(sk.SlimkitError, match="unsupported layer"):
        arch_of(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)),
                (torch.randn(1, 1, 8, 8),))
    with pytest.raises(sk.SlimkitError, match="odd kernel"):
        CNNArch((4,), (1,), (2,), 8)
