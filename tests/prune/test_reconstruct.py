"""Reconstruction after channel pruning: exact where the lost channels were redundant, a large
accuracy gain before any fine-tuning on real data, residual and transformer graphs, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.prune import Channels
from slimkit.prune.reconstruct import reconstruct
from tests.prune.hf_tiny import tiny


class Twins(nn.Module):
    """conv1's channels 8..15 copy channels 0..7 (filter and BatchNorm): removing them loses nothing
    a refitted conv2 cannot restore, since relu(bn(copy)) equals relu(bn(original))."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv1.weight[8:] = self.conv1.weight[:8]
            self.conv1.bias[8:] = self.conv1.bias[:8]
            self.bn1.weight.copy_(torch.rand(16) + 0.5)
            self.bn1.weight[8:] = self.bn1.weight[:8]
            self.bn1.bias[8:] = self.bn1.bias[:8]
            self.conv2.weight[:, :8] *= 10  # the originals feed conv2 strongly: L2 importance removes the copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W)
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))  # (B, 10)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_redundant_channels_are_restored_exactly() -> None:
    model = Twins().eval()
    calib = [(torch.randn(16, 3, 12, 12),) for _ in range(4)]
    task = types.SimpleNamespace(example=calib[0], calib=calib)
    pruned = sk.apply(model, Channels(amount=0.5, round_to=None, ignored=("conv2",)), task)
    assert pruned.conv1.out_channels == 8 and pruned.conv2.in_channels == 8
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        reference, plain = model(x), pruned(x)
    assert _rel_error(plain, reference) > 0.01  # plain pruning loses the copies' contribution
    fits, skipped = reconstruct(model, pruned, {}, calib, ridge=1e-9)
    assert not skipped and set(fits) == {"conv2"} and fits["conv2"].before > 0.1 and fits["conv2"].after < 1e-5
    with torch.no_grad():
        assert _rel_error(pruned(x), reference) < 1e-5  # unseen inputs too: the refit is the exact one


def test_mnist_is_usable_straight_after_pruning(mnist_task: sk.Task) -> None:
    plain = sk.apply(mnist_task.model, Channels(macs_ratio=0.25, round_to=None), mnist_task)
    rebuilt = sk.apply(mnist_task.model, Channels(macs_ratio=0.25, round_to=None, reconstruct=True), mnist_task)
    assert [p.shape for p in plain.parameters()] == [p.shape for p in rebuilt.parameters()]
    assert mnist_task.evaluate(plain)["score"] < 0.5  # a quarter of the MACs leaves a broken classifier
    assert mnist_task.evaluate(rebuilt)["score"] >= 0.97  # fp32 scores 0.990
    fits = last_record(rebuilt).reconstruction
    assert set(fits) == {"4", "8", "13", "15"}  # conv2, conv3, fc1, fc2: every layer that lost inputs
    assert all(f["after"] < 0.6 * f["before"] for f in fits.values())


@pytest.mark.parametrize("family", ["resnet", "bert"])
def test_residual_and_attention_graphs_get_closer_to_the_original(family: str) -> None:
    model, example = tiny(family)
    gen = torch.Generator().manual_seed(1)
    if family == "bert":
        calib = [(torch.randint(0, 100, (8, 16), generator=gen),) for _ in range(4)]
    else:
        calib = [(torch.randn(8, 3, 64, 64, generator=gen),) for _ in range(2)]
    task = types.SimpleNamespace(example=example, calib=calib)
    config = Channels(amount=0.25, round_to=None, heads=family == "bert")
    plain = sk.apply(model, config, task)
    rebuilt = sk.apply(model, dataclasses.replace(config, reconstruct=True), task)
    fits = last_record(rebuilt).reconstruction
    assert len(fits) >= 4 and all(f["after"] <= f["before"] for f in fits.values())
    x = calib[0][0]
    with torch.no_grad():
        out = lambda m: m(x).logits  # noqa: E731
        reference = out(model)
        assert _rel_error(out(rebuilt), reference) < 0.8 * _rel_error(out(plain), reference)


def test_depthwise_layers_are_listed_not_refitted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    calib = [(torch.randn(4, 3, 6, 6),)]
    pruned = sk.apply(model, Channels(amount=0.5, round_to=None, reconstruct=True),
                      types.SimpleNamespace(example=calib[0], calib=calib))
    assert "depthwise" in last_record(pruned).skipped["2"]
    assert "4" in last_record(pruned).reconstruction


def test_bad_requests_are_refused() -> None:
    model = Twins().eval()
    example = (torch.randn(2, 3, 8, 8),)
    with pytest.raises(SlimkitError, match="calibration inputs"):
        sk.apply(model, Channels(amount=0.5, reconstruct=True), types.SimpleNamespace(example=example))
    with pytest.raises(SlimkitError, match="ridge"):
        reconstruct(model, copy.deepcopy(model), {}, [example], ridge=0.0)


def test_conv1d_copies_are_restored_exactly() -> None:
    """The Twins construction in one dimension: a Conv1d is unfolded as a (k, 1) Conv2d and refitted exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 8, 5, padding=2, stride=2),
                          nn.Flatten(), nn.Linear(8 * 6, 4)).eval()
    with torch.no_grad():
        model[0].weight[8:], model[0].bias[8:] = model[0].weight[:8], model[0].bias[:8]
        model[2].weight[:, :8] *= 10  # L2 importance removes the copies
    calib = [(torch.randn(32, 3, 12),) for _ in range(2)]
    pruned = sk.apply(model, Channels(amount=0.5, round_to=None, ignored=("2",)),
                      types.SimpleNamespace(example=calib[0], calib=calib))
    assert pruned[2].in_channels == 8
    fits, skipped = reconstruct(model, pruned, {}, calib, ridge=1e-9)
    assert not skipped and set(fits) == {"2"} and fits["2"].before > 0.05 and fits["2"].after < 1e-5
    x = torch.randn(8, 3, 12)
    with torch.no_grad():
        assert _rel_error(pruned(x), model(x)) < 1e-5


def test_transposed_convs_are_listed_not_refitted() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 16, 3), nn.ReLU(), nn.ConvTranspose1d(16, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 8, 4)).eval()
    calib = [(torch.randn(4, 3, 8),)]
    pruned = sk.apply(model, Channels(amount=0.5, round_to=None, reconstruct=True),
                      types.SimpleNamespace(example=calib[0], calib=calib))
    assert pruned[2].in_channels == 8
    assert "ConvTranspose1d is not unfolded" in last_record(pruned).skipped["2"]
    assert last_record(pruned).reconstruction["4"]["after"] <= last_record(pruned).reconstruction["4"]["before"]
