"""Transformer breakdown by block part: attention / MLP / norm per block, the embeddings, a small ``(other)``.

Timed at the leaves, an HF encoder's attention math (scores, softmax, weighted sum written in
``forward``) and its masks fall into ``(other)``; by block part they belong to the attention row.
MACs and parameters per row are checked against hand counts; times are only checked to add up (the
share of time in ``(other)`` is a measurement: the profile benchmark and BENCHMARKS.md report it).
"""

from __future__ import annotations

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.measure import layer_breakdown
from slimkit.measure.block_units import OTHER
from tests.measure.models import SmallCNN

transformers = pytest.importorskip("transformers")

H, INTER, VOCAB, POS, LAYERS, B, T = 128, 512, 100, 128, 2, 8, 64


def _bert() -> tuple[torch.nn.Module, str, str]:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=INTER, max_position_embeddings=POS, num_labels=2)
    return transformers.BertForSequenceClassification(cfg), "bert.encoder.layer", "bert.embeddings"


def _distilbert() -> tuple[torch.nn.Module, str, str]:
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=H, n_layers=LAYERS, n_heads=4, hidden_dim=INTER,
                                        max_position_embeddings=POS, num_labels=2)
    model = transformers.DistilBertForSequenceClassification(cfg)
    return model, "distilbert.transformer.layer", "distilbert.embeddings"


#: model, hand params per block part (attention: q, k, v, output projection; MLP: up and down; norm: 2 LayerNorms)
CASES = {"bert": _bert, "distilbert": _distilbert}
ATTENTION_PARAMS = 4 * (H * H + H)
MLP_PARAMS = H * INTER + INTER + INTER * H + H
NORM_PARAMS = 2 * 2 * H
# projections (B, T, H) x (H, H) four times, then scores (T x T per head) and the weighted sum
ATTENTION_MACS = 4 * B * T * H * H + 2 * B * T * T * H
MLP_MACS = 2 * B * T * H * INTER


@pytest.fixture(scope="module", params=list(CASES))
def rows(request):
    torch.manual_seed(0)
    model, stack, embeddings = CASES[request.param]()
    ids = torch.randint(0, VOCAB, (B, T))
    return {r.name: r for r in layer_breakdown(model.eval(), (ids,), threads=1, runs=5)}, stack, embeddings, model


def test_the_attention_math_is_counted_in_the_blocks_not_in_other(rows):
    by_name, *_ = rows
    assert by_name[OTHER].macs_share < 0.01  # scores and weighted sums (2 B T^2 H per layer) sit in attention rows
    assert sum(r.time_share for r in by_name.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("part, params, macs", [("attention", ATTENTION_PARAMS, ATTENTION_MACS),
                                                 ("MLP", MLP_PARAMS, MLP_MACS), ("norm", NORM_PARAMS, 0)])
def test_every_block_has_its_parts_with_hand_params_and_macs(rows, part, params, macs):
    by_name, stack, _, _ = rows
    for i in range(LAYERS):
        row = by_name[f"{stack}.{i} {part}"]
        assert (row.params, row.macs) == (params, macs)
        assert row.kind != "-" and row.time_ms > 0


def test_embeddings_row_holds_the_tables_and_their_norm(rows):
    by_name, _, embeddings, model = rows
    module = model.get_submodule(embeddings)
    assert by_name[embeddings].params == sum(p.numel() for p in module.parameters())
    assert "Embeddings" in by_name[embeddings].kind


def test_parameters_and_macs_sum_to_the_model(rows):
    by_name, _, _, model = rows
    assert sum(r.params for r in by_name.values()) == sum(p.numel() for p in model.parameters())
    assert sum(r.macs_share for r in by_name.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("level", ["auto", "leaf"])
def test_a_cnn_stays_per_leaf(level):
    names = {r.name for r in layer_breakdown(SmallCNN(), torch.randn(1, 1, 28, 28), runs=1, level=level)}
    assert {"conv1", "conv2", "conv3", "fc"} <= names


@pytest.mark.parametrize("level, error", [("block", "no stack of attention blocks"),
                                          ("layers", "not a breakdown level")])
def test_bad_level_is_one_error(level, error):
    with pytest.raises(SlimkitError, match=error):
        layer_breakdown(SmallCNN(), torch.randn(1, 1, 28, 28), runs=1, level=level)
