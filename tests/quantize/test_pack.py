"""Packed integer formats: exact round trips, the stated ranges, and clear errors."""

from __future__ import annotations

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.formats import pack


def _gauss(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(64, 96), (16, 8, 3, 3)])
@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_round_trip_reproduces_integers(shape: tuple[int, ...], per_channel: bool) -> None:
    w = _gauss(*shape)
    q, scale = pack.quantize_weight_int8(w, per_channel)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == ((shape[0],) if per_channel else (1,))
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    # every row (or the tensor) reaches the full range: the max-abs element lands on ±127
    peak = q.abs().flatten(1).amax(1) if per_channel else q.abs().amax().reshape(1)
    assert torch.all(peak == 127)
    w_hat = pack.dequantize_int8(q, scale)
    assert (w - w_hat).abs().max() <= scale.max() / 2 + 1e-6
    q2, scale2 = pack.quantize_weight_int8(w_hat, per_channel)  # what an exporter re-quantizing sees
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale, rtol=1e-6, atol=0)


def test_int8_zero_rows_are_guarded() -> None:
    w = _gauss(4, 8)
    w[1] = 0
    q, scale = pack.quantize_weight_int8(w)
    assert float(scale[1]) == 1.0 and torch.all(q[1] == 0)
    assert torch.all(pack.dequantize_int8(q, scale)[1] == 0)
    q, scale = pack.quantize_weight_int8(torch.zeros(3, 5), per_channel=False)
    assert float(scale) == 1.0 and torch.all(q == 0)


def test_int4_pack_unpack_is_exact_and_two_per_byte() -> None:
    q = torch.randint(0, 16, (48, 128), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    packed = pack.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 64)
    assert packed.numel() * packed.element_size() == 48 * 128 // 2
    assert torch.equal(pack.unpack_int4(packed), q)
    # nibble order: element 2j in the low nibble, 2j + 1 in the high one (ONNX MatMulNBits order)
    assert pack.pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_quantize_dequantize(group_size: int) -> None:
    w = _gauss(32, 256)
    packed, scale, zero = pack.quantize_weight_int4(w, group_size)
    groups = 256 // group_size
    assert packed.shape == (32, 128) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (32, groups) and scale.dtype == zero.dtype == torch.float32
    q = pack.unpack_int4(packed).reshape(32, groups, group_size)
    assert torch.all(q.amin(-1) == 0) and torch.all(q.amax(-1) == 15)  # min and max land on the end levels
    w_hat = pack.dequantize_int4(packed, scale, zero)
    err = (w - w_hat).reshape(32, groups, group_size).abs().amax(-1)
    assert torch.all(err <= scale / 2 + 1e-5)
    # the group's min and max are reproduced (up to float rounding of the zero point)
    wg, wg_hat = w.reshape(32, groups, group_size), w_hat.reshape(32, groups, group_size)
    torch.testing.assert_close(wg_hat.amin(-1), wg.amin(-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(wg_hat.amax(-1), wg.amax(-1), rtol=0, atol=1e-5)


def test_int4_constant_group_is_exact() -> None:
    w = torch.full((2, 64), 0.75)
    packed, scale, zero = pack.quantize_weight_int4(w, 32)
    assert torch.equal(pack.dequantize_int4(packed, scale, zero), w)


@pytest.mark.parametrize("k, group_size", [(100, 64), (96, 7), (33, 0)])
def test_int4_refuses_shapes_it_cannot_pack(k: int, group_size: int) -> None:
    with pytest.raises(SlimkitError, match="group size") as info:
        pack.quantize_weight_int4(_gauss(8, k), group_size)
    assert info.value.hint


def test_bad_weights_are_refused() -> None:
    w = _gauss(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(SlimkitError, match="NaN"):
        pack.quantize_weight_int8(w)
    with pytest.raises(SlimkitError, match="int4"):
        pack.quantize_weight_int4(_gauss(4, 8, 3, 3), 32)


def test_activation_params() -> None:
    scale, zero = pack.act_qparams(-2.0, 4.0, symmetric=True)
    assert scale.shape == () and scale.dtype == torch.float32 and zero.dtype == torch.int32
    assert float(scale) == pytest.approx(4.0 / 127) and int(zero) == 0
    scale, zero = pack.act_qparams(-1.0, 3.0, symmetric=False)
    assert float(scale) == pytest.approx(4.0 / 255) and int(zero) == round(1.0 / (4.0 / 255))
    qmin, qmax = pack.act_qrange(False)
    x = torch.tensor([-1.0, 0.0, 3.0, 10.0])
    fq = pack.fake_quant_act(x, scale, zero.float(), qmin, qmax)
    assert float(fq[1]) == 0.0  # zero is exact
    assert float(fq[3]) == pytest.approx((255 - int(zero)) * float(scale))  # clipped at the top level
    scale, zero = pack.act_qparams(0.5, 2.0, symmetric=False)  # range widened to include 0
    assert int(zero) == 0 and float(scale) == pytest.approx(2.0 / 255)
    with pytest.raises(SlimkitError, match="range"):
        pack.act_qparams(1.0, -1.0)


@pytest.mark.parametrize("lo, hi", [(-2.3, 4.1), (0.0, 6.0), (-0.7, 0.0), (1e-3, 2.5), (0.0, 0.0)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_activation_params_agree_with_the_exporter_and_round_trip(lo: float, hi: float, symmetric: bool) -> None:
    from slimkit.calibrate.ranges import scale_zero_point  # what the ONNX Runtime exporter uses

    scale, zero = pack.act_qparams(lo, hi, symmetric)
    ref_scale, ref_zero = scale_zero_point(lo, hi, 8, symmetric)
    assert scale == torch.tensor(ref_scale, dtype=torch.float32) and int(zero) == ref_zero
    back = pack.act_qparams(*pack.act_range_of(scale, zero, symmetric), symmetric)
    assert torch.equal(back[0], scale) and torch.equal(back[1], zero)
