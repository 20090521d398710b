"""Sparsity plots are real PNGs of a readable size; layer_sparsity counts exact zeros."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from slimkit import SlimkitError
from slimkit.prune.plots import layer_sparsity, sparsity_heatmap, sparsity_trend

image = pytest.importorskip("matplotlib.image")


def test_layer_sparsity_is_exact_on_planted_zeros():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5),
                          nn.Sequential(nn.Linear(5, 2)))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        model[0].weight.view(-1)[:27].zero_()   # 27 of 108
        model[4].weight[:, :2] = 0.0            # 10 of 40
        model[0].bias.zero_()                   # biases do not count
    assert layer_sparsity(model) == {"0": 0.25, "4": 0.25, "5.0": 0.0}
    torch_prune.l1_unstructured(model[5][0], "weight", amount=0.5)  # a mask counts as zeros
    assert layer_sparsity(model)["5.0"] == 0.5


def test_heatmap_of_50_layers_by_steps_is_a_readable_png(tmp_path):
    snapshots = [(step, {f"encoder.layer.{i}.attention.output.dense": min(1.0, step / 100 * (i % 7) / 6)
                         for i in range(50)}) for step in range(0, 101, 10)]
    out = sparsity_heatmap(snapshots, tmp_path / "plots" / "heat.png")
    img = image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = img.shape[:2]
    assert h >= 50 * 18 and 400 <= w <= 1400  # ~20 px per layer row at 100 dpi
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in out.parent.iterdir()] == ["heat.png"]  # written atomically, no temp left


def test_heatmap_accepts_layer_by_kind_and_flat_mappings(tmp_path):
    grid = {"conv1": {"weight": 0.5, "channels": 0.25}, "fc": {"weight": 0.9}}  # a missing cell is blank
    a = image.imread(sparsity_heatmap(grid, tmp_path / "grid.png", column_label="what"))
    b = image.imread(sparsity_heatmap({"conv1": 0.5, "fc": 0.1}, tmp_path / "flat.png"))
    assert a.shape[0] > 100 and b.shape[0] > 100 and a.shape[1] > 300
    with pytest.raises(SlimkitError, match="outside \\[0, 1\\]"):
        sparsity_heatmap({"conv1": 50.0}, tmp_path / "bad.png")
    with pytest.raises(SlimkitError, match="no layers"):
        sparsity_heatmap({}, tmp_path / "empty.png")


def test_trend_single_and_named_series_with_target(tmp_path):
    cubic = [(s, 0.9 * (1 - (1 - s / 100) ** 3)) for s in range(0, 101, 5)]
    one = sparsity_trend(cubic, tmp_path / "one.png")
    many = sparsity_trend({"global": cubic, "layer-wise": [(s, v * 0.8) for s, v in cubic]},
                          tmp_path / "many.png", target=0.9)
    for path in (one, many):
        img = image.imread(path)
        assert img.shape[0] == 380 and img.shape[1] == 700 and img[..., :3].std() > 0.05
    with pytest.raises(SlimkitError, match="no \\(step, sparsity\\) points"):
        sparsity_trend([], tmp_path / "none.png")
