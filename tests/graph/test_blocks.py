"""The block stack is found in every HF encoder family and cut to a subset with its configs synced."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.graph.blocks import block_list, encoder_blocks, keep_blocks
from tests.prune.hf_tiny import tiny


@pytest.mark.parametrize("family,attr", [("bert", "layer"), ("distilbert", "layer"), ("vit", "layers")])
def test_stack_is_found_and_cut(family, attr):
    model, x = tiny(family)
    parent, name = block_list(model)
    assert name == attr and len(getattr(parent, name)) == 2
    first_block = encoder_blocks(model)[1]
    keep_blocks(model, [1])
    assert encoder_blocks(model) == [first_block]
    assert model.config.num_hidden_layers == 1 if hasattr(model.config, "num_hidden_layers") else True
    with torch.inference_mode():
        out = model(*x).logits
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_a_cnn_has_no_stack():
    with pytest.raises(SlimkitError, match="no list of transformer encoder blocks"):
        block_list(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
