"""Channels-last is chosen by timing, and computes what the NCHW model computes."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.runtime import build
from slimkit.runtime.layout import ChannelsLast, fastest_layout


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def test_channels_last_matches_nchw():
    model, x = _convnet(), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, got = model(x), ChannelsLast(model)(x)
    assert got.shape == ref.shape and float((got - ref).abs().max()) < 1e-4
    assert next(model.parameters()).is_contiguous()            # the original is left as it was


def test_fastest_layout_keeps_the_faster_and_says_so():
    model, x = _convnet(), torch.randn(8, 3, 64, 64)
    chosen, name, ms = fastest_layout(model, (x,), threads=1, runs=3)
    assert set(ms) == {"contiguous", "channels_last"} and all(v > 0 for v in ms.values())
    assert name == ("channels_last" if ms["channels_last"] < 0.95 * ms["contiguous"] else "contiguous")
    assert isinstance(chosen, ChannelsLast) == (name == "channels_last")
    with torch.no_grad():
        assert float((chosen(x) - model(x)).abs().max()) < 1e-4


def test_small_inputs_and_plain_nets_are_returned_as_they_are(digits_task):
    assert build(digits_task.model, "torch", digits_task.example) is digits_task.model   # 8x8 images: not timed
    model = _convnet()
    assert build(model, "torch", (torch.randn(1, 3, 64, 64),), layout="contiguous") is model
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 10))
    assert fastest_layout(mlp, (torch.randn(1, 3, 64, 64),))[1:] == ("contiguous", {})
