"""Binary / ternary: exact bit packing, straight-through gradients, and mnist sizes and accuracy."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.formats.bitpack import pack_bits, unpack_bits
from slimkit.io import artifact_bytes
from slimkit.quantize.extreme import Binary, Ternary
from slimkit.quantize.extreme_modules import BitConv2d, BitLinear, ExtremeConv2d, ExtremeLinear


@pytest.mark.parametrize("bits,k", [(1, 8), (1, 13), (2, 4), (2, 37)])
def test_bit_packing_round_trip_is_exact(bits, k):
    codes = torch.randint(0, 2 ** bits, (5, k), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, -(-k * bits // 8)) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, bits, k), codes)
    assert int(pack_bits(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]]), 1)) == 0b10000001  # LSB first
    with pytest.raises(SlimkitError, match="codes outside"):
        pack_bits(torch.full((1, 4), 4), 2)


def test_ternary_layer_values_and_gradients():
    torch.manual_seed(0)
    lin = ExtremeLinear.from_float(nn.Linear(32, 4), "ternary")
    w = lin.weight.detach()
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    t = lin.extreme_weight()
    wp, wn = lin.log_wp.exp().detach(), lin.log_wn.exp().detach()
    assert torch.allclose(t.detach(), torch.where(w > delta, wp[:, None], torch.where(w < -delta, -wn[:, None], 0.0)))
    t.sum().backward()
    pos, neg = w > delta, w < -delta
    assert torch.allclose(lin.weight.grad, torch.where(pos, wp[:, None], torch.where(neg, wn[:, None], 1.0)))
    assert torch.allclose(lin.log_wp.grad, pos.sum(1) * wp)  # d/dlog Wp of sum(Wp * pos)
    stored = lin.convert()
    assert isinstance(stored, BitLinear) and stored.packed.shape == (4, 8)  # 32 weights x 2 bits = 8 bytes
    assert torch.allclose(stored.flat_weight(), t.detach())


def test_binary_conv_stores_one_bit_and_matches_training_forward():
    torch.manual_seed(0)
    conv = ExtremeConv2d.from_float(nn.Conv2d(4, 6, 3, padding=1), "binary")
    stored = conv.convert()
    assert isinstance(stored, BitConv2d) and stored.packed.shape == (6, 5)  # 36 weights -> 5 bytes
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.allclose(stored(x), conv(x), atol=1e-6)
    w = conv.weight
    conv.extreme_weight().sum().backward()
    alpha = w.detach().abs().flatten(1).mean(1)
    assert torch.all(w.grad[w.detach().abs() <= 1] != 0)  # straight through sign (plus alpha's own term)
    assert torch.allclose(stored.scale_pos, alpha)


@pytest.mark.slow
def test_ternary_mnist_accuracy_size_and_reload(mnist_task, one_thread, tmp_path):
    m = sk.apply(mnist_task.model, Ternary(steps=300), mnist_task)
    info = last_record(m)
    assert info.layers == ["4", "8", "13"] and info.int8_layers == ["0", "15"]
    assert info.training.score >= 0.97  # fp32 0.990; the benchmark's 300-step run: 0.987
    sk.save(mnist_task.model, tmp_path / "fp32")
    sk.save(m, tmp_path / "t")
    assert artifact_bytes(tmp_path / "fp32") / artifact_bytes(tmp_path / "t") >= 12.0
    back = sk.load(tmp_path / "t")
    x = mnist_task.eval[0][0][0]
    with torch.no_grad():
        assert torch.equal(back(x), m(x))
    assert mnist_task.evaluate(back)["score"] == info.training.score


def test_configs_round_trip_and_refuse_bad_values():
    for c in (Binary(steps=10), Ternary(threshold=0.5, keep_first_last=False)):
        assert BaseConfig.from_json(c.to_json()) == c
    with pytest.raises(SlimkitError, match="threshold"):
        Ternary(threshold=3.0)
    with pytest.raises(SlimkitError, match="training data"):
        sk.apply(nn.Sequential(nn.Linear(4, 4)), Binary(), None)


@pytest.mark.parametrize("k", [9, 16])  # odd rows are padded to a whole byte
def test_int4_codes_pack_exactly_and_reload(k):
    from slimkit.quantize.extreme_modules import int4_stored

    gen = torch.Generator().manual_seed(k)
    lin = nn.Linear(k, 6)
    codes = torch.randint(-8, 8, (6, k), generator=gen)
    step = torch.rand(6, generator=gen) + 0.1
    stored = int4_stored(lin, codes, step)
    assert stored.packed.shape == (6, (k + 1) // 2)  # two weights per byte
    assert torch.equal(stored.flat_weight(), codes.float() * step[:, None])
    conv = nn.Conv2d(1, 6, 3)  # K = 9
    stored_conv = int4_stored(conv, codes[:, :9], step)
    assert isinstance(stored_conv, BitConv2d) and stored_conv.packed.shape == (6, 5)
    x = torch.randn(2, 1, 5, 5)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x, (codes[:, :9].float() * step[:, None]).reshape(6, 1, 3, 3), conv.bias)
        assert torch.allclose(stored_conv(x), ref, atol=1e-6)
    back = BitConv2d.empty(stored_conv.spec())  # what slimkit.load rebuilds from the spec + state_dict
    back.load_state_dict(stored_conv.state_dict())
    with torch.no_grad():
        assert torch.equal(back(x), stored_conv(x))
    with pytest.raises(SlimkitError, match="stored width"):
        BitLinear(8, 2, bits=3)
