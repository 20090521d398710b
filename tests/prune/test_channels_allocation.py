"""allocation='macs': channels are removed where they cost the most MACs per importance lost."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.errors import SlimkitError
from slimkit.measure.flops import count_flops
from slimkit.prune import Channels
from slimkit.train import finetune
from tests.prune.hf_tiny import tiny


def _task(example: tuple) -> types.SimpleNamespace:
    return types.SimpleNamespace(example=example)


def _widths(model: nn.Module) -> list[int]:
    return [p.shape[0] for p in model.parameters() if p.dim() > 1]


def test_mlp_prunes_the_expensive_group_more() -> None:
    # fc1 (16->64) and fc2 (64->64) share group A (fc1's outputs), fc2 and fc3 (64->4) group B:
    # a channel of A costs 16 + 64 MACs, one of B 64 + 4, so A gives up more channels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    example = (torch.randn(2, 16),)
    base = count_flops(model, example).macs
    pruned = sk.apply(model, Channels(macs_ratio=0.5, round_to=None, allocation="macs"), _task(example))
    a, b = pruned[0].out_features, pruned[2].out_features
    macs = count_flops(pruned, example).macs
    assert macs <= 0.5 * base and macs >= 0.45 * base
    assert a < b and min(a, b) >= 16  # no group below a quarter of its channels
    assert pruned(*example).shape == (2, 4)


def test_mnist_keeps_the_cheap_hidden_layer_and_recovers(mnist_task: sk.Task, one_thread: None) -> None:
    base = count_flops(mnist_task.model, mnist_task.example).macs
    pruned = sk.apply(mnist_task.model, Channels(macs_ratio=0.5, round_to=None, allocation="macs"), mnist_task)
    macs = count_flops(pruned, mnist_task.example).macs / base
    widths = _widths(pruned)  # conv1, conv2, conv3, fc1, fc2
    assert 0.48 <= macs <= 0.5
    assert widths[3] == 128 and widths[4] == 10  # 128 hidden units cost 4% of the MACs: kept
    assert min(w / full for w, full in zip(widths, (16, 32, 64, 128, 10))) >= 0.25
    uniform = sk.apply(mnist_task.model, Channels(macs_ratio=0.5, round_to=None), mnist_task)
    assert _widths(uniform)[3] < 128  # the uniform ratio pays for MACs with hidden units too
    assert mnist_task.evaluate(pruned)["score"] >= 0.5
    finetune(pruned, mnist_task, steps=60, progress=False, seed=0)
    assert mnist_task.evaluate(pruned)["score"] >= 0.97


def test_depthwise_conv_follows_its_group() -> None:
    # conv (3->32) -> depthwise (32, groups=32) -> pointwise (32->64) -> pool -> fc: the depthwise conv
    # shares its in/out channels with the first conv's group and is pruned along with it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    example = (torch.randn(2, 3, 16, 16),)
    base = count_flops(model, example).macs
    pruned = sk.apply(model, Channels(macs_ratio=0.6, round_to=None, allocation="macs"), _task(example))
    assert 0.55 * base <= count_flops(pruned, example).macs <= 0.6 * base
    assert pruned[3].groups == pruned[3].in_channels == pruned[3].out_channels == pruned[0].out_channels < 32
    assert pruned(*example).shape == (2, 10)


@pytest.mark.parametrize("kwargs, message", [
    ({"allocation": "flops"}, "unknown allocation"), ({"allocation": "macs", "scope": "global"}, "conflicts")])
def test_invalid_allocations_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SlimkitError, match=message):
        Channels(**kwargs)


def test_attention_heads_are_refused_with_a_way_out() -> None:
    model, example = tiny("bert")
    with pytest.raises(SlimkitError, match="does not allocate attention heads"):
        sk.apply(model, Channels(macs_ratio=0.7, allocation="macs"), _task(example))
