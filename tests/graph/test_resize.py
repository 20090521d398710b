"""Pruned artifacts reload: the builder's model is shrunk to the saved widths, outputs bit-identical."""

from __future__ import annotations

import types

import pytest
import torch

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.prune import Channels
from tests.prune.hf_tiny import tiny


def test_pruned_digits_artifact_reloads_identically(digits_task: sk.Task, tmp_path) -> None:
    pruned = sk.apply(digits_task.model, Channels(amount=0.5), digits_task)
    path = sk.save(pruned, tmp_path / "pruned")
    assert sk.io.read_meta(path)["structure"] == "resized"
    loaded = sk.load(path)
    x = digits_task.example[0].repeat(8, 1, 1, 1)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert sum(p.numel() for p in loaded.parameters()) == last_record(pruned).params[1]


@pytest.mark.parametrize("family", ["mobilenet_v2", "regnet", "distilbert"])
def test_pruned_hf_model_loads_into_a_fresh_original(family: str, tmp_path) -> None:
    model, example = tiny(family)
    pruned = sk.apply(model, Channels(amount=0.5), types.SimpleNamespace(example=example))
    path = sk.save(pruned, tmp_path / family)
    fresh, _ = tiny(family)
    loaded = sk.load(path, model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(*example).logits, pruned(*example).logits)
