"""Measured latency tables: per-layer ms over a grid of kept widths, and which width a pool runs at."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.measure.latency_table import GRID, LeafCost, measure_table


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10)).eval()


def test_interpolation_is_exact_on_the_grid_and_linear_between() -> None:
    grid = (0.25, 0.5, 1.0)
    cost = LeafCost(grid, ((1.0, 2.0, 4.0), (2.0, 4.0, 8.0), (4.0, 8.0, 16.0)))  # ms = 16 * kin * kout
    assert cost.full_ms == 16.0
    assert cost.at(0.5, 0.25) == pytest.approx(2.0)
    assert cost.at(0.75, 1.0) == pytest.approx(12.0)  # halfway between 8 and 16
    assert cost.at(0.125, 1.0) == pytest.approx(2.0)  # below the grid: linear towards 0 ms at width 0
    assert cost.at(1.0, 0.125) == pytest.approx(2.0)
    one_sided = LeafCost(grid, ((1.0, 2.0, 4.0),))  # BatchNorm/pooling: read by the output width only
    assert one_sided.at(0.3, 0.75) == pytest.approx(3.0) == one_sided.at(1.0, 0.75)


def test_table_times_every_width_dependent_layer(one_thread: None) -> None:
    model = _net()
    example = (torch.randn(1, 3, 64, 64),)
    table = measure_table(model, example, batch=4, runs=3)
    assert table.batch == 4 and table.threads == 1
    assert set(table.costs) == {"0", "1", "2", "3", "4", "5", "6", "7", "9"}  # not Flatten: it costs nothing
    assert table.feeds == {"2": "1", "3": "2", "6": "5", "7": "6"}  # relu reads the BN, the pool reads the relu
    two_sided = {n for n, c in table.costs.items() if len(c.ms) == len(GRID)}
    assert two_sided == {"0", "5", "9"}  # convs and linears: by input and output width; the depthwise conv by one
    assert all(len(c.ms[0]) == len(GRID) and min(min(r) for r in c.ms) > 0 for c in table.costs.values())
    conv = table.costs["5"]  # 64 -> 128 channels on 32x32 maps x 4 images: ~75 MMACs at full width
    assert conv.at(1.0, 1.0) == pytest.approx(conv.full_ms)  # the grid's corner is the full-width timing
    assert "full_ms" in table.to_dict() and len(table.to_dict()["full_ms"]) == 9


def test_identical_layers_on_identical_inputs_are_timed_once(one_thread: None) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)).eval()
    table = measure_table(model, (torch.randn(2, 8, 16, 16),), runs=3)
    assert table.costs["0"] is table.costs["1"]
    assert table.batch == 2  # no batch given: the example's own
