"""Size is the artifact's bytes on disk; parameter counts see pruned (zeroed) weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit import io
from slimkit.measure import artifact_size, count_params
from tests.measure.models import SmallCNN


def _disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def test_artifact_size_is_the_bytes_on_disk(tmp_path):
    model = SmallCNN()
    path = io.save(model, tmp_path / "cnn")
    assert artifact_size(model) == _disk_bytes(path)


def test_fp32_size_is_four_bytes_per_param_plus_small_headers():
    model = SmallCNN()
    total, _ = count_params(model)
    overhead = artifact_size(model) - 4 * total
    assert 0 < overhead < 4096  # safetensors header + slimkit.json


def test_half_precision_halves_the_artifact():
    model = SmallCNN()
    full = artifact_size(model)
    half = artifact_size(model.half())
    assert 0.49 < half / full < 0.53


def test_count_params_total_and_nonzero_after_zeroing():
    layer = nn.Linear(10, 5)  # 50 weights + 5 biases
    with torch.no_grad():
        layer.weight.view(-1)[:7] = 0.0
        layer.bias.fill_(1.0)
    assert count_params(layer) == (55, 48)


def test_shared_parameters_are_counted_once():
    a = nn.Linear(4, 4, bias=False)
    b = nn.Linear(4, 4, bias=False)
    b.weight = a.weight  # tied
    assert count_params(nn.Sequential(a, b)) == (16, 16)


class _AudioAttention(nn.Module):
    """Conv1d -> LSTM -> MultiheadAttention: every storage layer kind slimkit swaps in for these."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(16, 64, 3)
        self.lstm = nn.LSTM(64, 64, batch_first=True)
        self.mha = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 16, T)
        y, _ = self.lstm(self.conv(x).transpose(1, 2))  # (B, T-2, 64)
        return self.mha(y, y, y)[0]


def _mlp_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 6 * 6, 128), nn.ReLU(),
                         nn.Linear(128, 64))


@pytest.mark.parametrize("make,config,bytes_per_param", [
    (_mlp_cnn, lambda: sk.quantize.Int8(), (1.0, 1.3)),
    (_mlp_cnn, lambda: sk.quantize.WeightOnly(bits=4, group_size=32, targets="all"), (0.5, 0.85)),
    (_mlp_cnn, lambda: sk.quantize.Float16(), (2.0, 2.3)),
    (_AudioAttention, lambda: sk.quantize.Int8(), (1.6, 2.3)),  # Int8 leaves the attention (a third) float
    (_AudioAttention, lambda: sk.quantize.WeightOnly(bits=8, targets="all"), (1.0, 1.3)),
])
def test_a_quantized_model_counts_the_weights_it_stores(make, config, bytes_per_param):
    model = make()
    total, _ = count_params(model)
    q = sk.apply(model, config())
    q_total, q_nonzero = count_params(q)
    assert q_total == total  # int8 codes, packed int4, fp16 buffers stand for as many weights as the original
    assert 0.9 * total < q_nonzero <= total  # a few weights round to zero
    low, high = bytes_per_param
    assert low <= artifact_size(q) / q_total < high
