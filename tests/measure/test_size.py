"""Size is the artifact's bytes on disk; parameter counts see pruned (zeroed) weights."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

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
