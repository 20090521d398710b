"""Dependency groups: coupled layers found, blocked groups explained, attention blocks detected."""

from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.graph import attention, dependency
from tests.prune.hf_tiny import tiny
from tests.prune.test_channels import Residual, Scale


def test_residual_writers_share_one_group() -> None:
    model = Residual().eval()
    groups = dependency.list_groups(model, (torch.randn(1, 3, 8, 8),))
    by_root = {g.root: g for g in groups}
    residual = next(g for g in groups if "stem" in g.members)
    assert {"stem", "bn0", "b", "bnb", "a", "fc"} <= set(residual.members)
    assert residual.channels == 16
    inner = next(g for g in groups if g.root == "a" or ("a" in g.members and "bna" in g.members and "stem" not in g.members))
    assert "bna" in inner.members and "stem" not in inner.members
    assert len(by_root) == len(groups)


def test_custom_layer_blocks_its_group_with_a_reason() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.Conv2d(8, 4, 3)).eval()
    groups = dependency.list_groups(model, (torch.randn(1, 3, 8, 8),))
    blocked = [g for g in groups if g.blocked]
    assert len(blocked) == 1 and "Scale" in blocked[0].blocked and blocked[0].channels == 8
    assert dependency.custom_layers(model) == {"1": "custom layer Scale owns parameters gain the graph cannot slice"}


def test_attention_blocks_found_in_bert_and_swin_heads_frozen() -> None:
    bert, _ = tiny("bert")
    blocks = attention.attention_blocks(bert)
    assert [(b.heads, b.head_dim, b.frozen_reason) for b in blocks] == [(4, 16, None)] * 2
    swin, _ = tiny("swin")
    swin_blocks = attention.attention_blocks(swin)
    assert [b.heads for b in swin_blocks] == [2, 4]
    assert all("relative_position_bias_table" in b.frozen_reason for b in swin_blocks)


def test_output_layer_is_the_last_linear_that_runs() -> None:
    model, example = tiny("resnet")
    assert dependency.output_layer(model, example) == "classifier.1"
    assert dependency.resolve_names(model, [r"classifier\..*", "nope["]) == ["classifier.0", "classifier.1"]
