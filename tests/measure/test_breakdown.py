"""Per-layer breakdown: shares sum to one, the heaviest layer is the expected one, rows are sorted."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure import layer_breakdown
from tests.measure.models import SmallCNN


@pytest.fixture(scope="module")
def cnn_rows():
    return layer_breakdown(SmallCNN(), torch.randn(2, 1, 28, 28), runs=3, sort_by="macs")


def test_shares_sum_to_one(cnn_rows):
    for column in ("macs_share", "params_share", "time_share"):
        assert sum(getattr(r, column) for r in cnn_rows) == pytest.approx(1.0, abs=1e-9)


def test_rows_carry_hand_macs_and_params(cnn_rows):
    by_name = {r.name: r for r in cnn_rows}
    hand = SmallCNN.hand_macs(2)
    assert {name: by_name[name].macs for name in hand} == hand
    assert by_name["conv3"].params == 32 * 64 * 9 + 64
    assert by_name["pool"].macs == 0 and by_name["pool"].kind == "MaxPool2d"
    assert by_name["conv3"].macs_share == pytest.approx(hand["conv3"] / sum(hand.values()))


def test_largest_macs_layer_first_when_sorted_by_macs(cnn_rows):
    assert cnn_rows[0].name == "conv3"
    assert [r.macs for r in cnn_rows] == sorted((r.macs for r in cnn_rows), reverse=True)


def test_times_are_medians_and_positive(cnn_rows):
    convs = [r for r in cnn_rows if r.kind == "Conv2d"]
    assert all(r.time_ms > 0 for r in convs)


def test_sort_by_params_and_other_row_for_parent_parameters():
    class WithBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.big = nn.Linear(50, 40)
            self.small = nn.Linear(40, 2)
            self.offset = nn.Parameter(torch.zeros(2))  # held by the parent, not by a leaf

        def forward(self, x):
            return self.small(self.big(x)) + self.offset

    rows = layer_breakdown(WithBias(), torch.randn(3, 50), runs=2, sort_by="params")
    assert [r.name for r in rows[:2]] == ["big", "small"]
    other = next(r for r in rows if r.name == "(other)")
    assert other.params == 2
    assert sum(r.params_share for r in rows) == pytest.approx(1.0)


def test_bad_sort_key_is_a_clear_error():
    with pytest.raises(SlimkitError, match="sort_by='speed'"):
        layer_breakdown(nn.Linear(2, 2), torch.ones(1, 2), sort_by="speed")
