"""MACs must equal hand-computed values: Linear, Conv2d (stride, padding, groups), models, attention."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from slimkit.measure import count_flops
from tests.measure.models import Attention, SmallCNN


@pytest.mark.parametrize("batch, fin, fout", [(1, 10, 5), (8, 64, 32), (3, 7, 1)])
def test_linear_macs_are_batch_in_out(batch, fin, fout):
    count = count_flops(nn.Linear(fin, fout), torch.randn(batch, fin))
    assert count.macs == batch * fin * fout
    assert count.flops == 2 * count.macs
    assert count.by_leaf == {"": batch * fin * fout}


def test_linear_on_sequence_counts_every_token():
    count = count_flops(nn.Linear(16, 4), torch.randn(2, 5, 16))  # (B, T, C)
    assert count.macs == 2 * 5 * 16 * 4


@pytest.mark.parametrize("cin, cout, k, stride, pad, groups, size", [
    (3, 8, 3, 1, 1, 1, 16),
    (4, 8, 3, 2, 0, 2, 15),
    (8, 8, 5, 2, 2, 8, 17),  # depthwise
    (6, 12, 1, 1, 0, 3, 9),
])
def test_conv2d_macs_match_hand_formula(cin, cout, k, stride, pad, groups, size):
    batch = 2
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, groups=groups)
    out = (size + 2 * pad - k) // stride + 1
    hand = batch * cout * out * out * (cin // groups) * k * k
    assert count_flops(conv, torch.randn(batch, cin, size, size)).macs == hand


def test_sequential_total_is_sum_of_layers():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    count = count_flops(model, torch.randn(4, 20))
    assert count.by_leaf == {"0": 4 * 20 * 30, "1": 0, "2": 4 * 30 * 10}
    assert count.macs == sum(count.by_leaf.values()) == 4 * 20 * 30 + 4 * 30 * 10
    assert count.outside_leaves == 0


def test_cnn_per_module_macs_and_reused_pool():
    count = count_flops(SmallCNN(), torch.randn(2, 1, 28, 28))
    hand = SmallCNN.hand_macs(2)
    assert {name: count.by_leaf[name] for name in hand} == hand
    assert count.by_leaf["pool"] == 0  # one row although called twice
    assert count.macs == sum(hand.values())
    assert count.by_module[""] == count.macs


def test_functional_matmul_in_forward_is_outside_leaves():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 6)

        def forward(self, x):
            return self.fc(x) + x @ self.fc.weight.T  # second matmul belongs to no leaf

    count = count_flops(Tied(), torch.randn(3, 8))
    assert count.by_leaf == {"fc": 3 * 8 * 6}
    assert count.outside_leaves == 3 * 8 * 6
    assert count.macs == 2 * 3 * 8 * 6


@pytest.mark.parametrize("as_dict", [False, True])
def test_cpu_attention_is_counted_and_dict_inputs_work(as_dict):
    model = Attention(vocab=50, dim=16, heads=2)
    ids = torch.randint(0, 50, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": mask} if as_dict else (ids, mask)
    B, T, C = 2, 10, 16
    hand = B * T * C * 3 * C + 2 * B * T * T * C + B * T * C * C  # qkv, q@k^T and @v, out
    count = count_flops(model, example)
    assert count.macs == hand
    assert count.outside_leaves == 2 * B * T * T * C


def test_quantized_linear_macs_come_from_shapes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic = getattr(getattr(torch, "ao", None), "quantization", None)
        if quantize_dynamic is None or not hasattr(quantize_dynamic, "quantize_dynamic"):
            pytest.skip("torch.ao.quantization is gone in this torch")
        model = quantize_dynamic.quantize_dynamic(nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)),
                                                  {nn.Linear}, dtype=torch.qint8)
        count = count_flops(model, torch.randn(4, 20))
    assert count.by_leaf == {"0": 4 * 20 * 30, "1": 0, "2": 4 * 30 * 5}  # not "0._packed_params"
    assert set(count.shape_derived) == {"0", "2"}
    assert count.macs == 4 * 20 * 30 + 4 * 30 * 5


def test_counting_leaves_the_model_as_it_was():
    model = SmallCNN().train()
    torch.set_grad_enabled(True)
    count_flops(model, torch.randn(1, 1, 28, 28))
    assert model.training
    assert not model._forward_hooks and not model.conv1._forward_pre_hooks


@pytest.mark.parametrize("layer,x,expected", [
    # LSTM: 4 gates, each hidden x (input + hidden) per sample and step; the second layer reads the first's hidden
    (nn.LSTM(8, 32, num_layers=2, batch_first=True), (4, 10, 8), 4 * 10 * (4 * 32 * (8 + 32) + 4 * 32 * (32 + 32))),
    (nn.GRU(8, 16, bidirectional=True), (10, 4, 8), 4 * 10 * 2 * 3 * 16 * (8 + 16)),  # (T, B, in), 2 directions
    (nn.LSTMCell(16, 32), (4, 16), 4 * 4 * 32 * (16 + 32)),
    (nn.RNN(5, 7), (6, 5), 6 * 7 * (5 + 7)),  # unbatched (T, in)
])
def test_recurrent_layers_count_their_gate_macs(layer, x, expected):
    count = count_flops(layer.eval(), (torch.randn(*x),))
    assert count.macs == expected
