"""QuantLinear / QuantConv2d: accuracy (SQNR), stored form, kernels and their fallbacks."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit.io as skio
from slimkit.core.errors import SlimkitError
from slimkit.formats import pack
from slimkit.quantize import _kernels
from slimkit.quantize.modules import DEQUANT_ABOVE_M, QuantConv2d, QuantLinear, build_quant_module
from tests.conftest import sqnr_db

K, N = 256, 192


def _linear(k: int = K, n: int = N, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.normal_()  # Gaussian weights
    return lin


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


STATIC = {"activations": "static", "act_range": (-4.0, 4.0)}
# (config, minimum SQNR in dB vs the float layer on Gaussian weights and inputs). Measured here:
# int8 46 dB, dynamic 36 (7-bit activations without VNNI), static 40, int4 g64 24, g128 23.
LINEAR_CASES: list[tuple[dict[str, Any], float]] = [
    ({"bits": 8}, 40.0),
    ({"bits": 8, "per_channel": False}, 38.0),
    ({"bits": 4, "group_size": 64}, 21.0),
    ({"bits": 4, "group_size": 128}, 20.0),
    ({"activations": "dynamic"}, 32.0),
    (STATIC, 36.0),
    ({**STATIC, "symmetric_act": False}, 36.0),
]


@pytest.mark.parametrize("config, min_db", LINEAR_CASES, ids=lambda c: json.dumps(c) if isinstance(c, dict) else None)
def test_linear_sqnr_vs_float(config: dict[str, Any], min_db: float) -> None:
    lin, x = _linear(), _x(64, K)
    m = QuantLinear.from_float(lin, **config)
    with torch.no_grad():
        assert sqnr_db(lin(x), m(x)) >= min_db
    assert m.kernel and (m.fallback_reason is None or "\n" not in m.fallback_reason)


def test_per_channel_beats_per_tensor_on_uneven_rows() -> None:
    lin, x = _linear(), _x(32, K)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 0, N)[:, None])  # row magnitudes spread over 100x
        ref, small = lin(x), slice(0, N // 4)  # the quarter of outputs with the smallest rows
        per_channel, per_tensor = QuantLinear.from_float(lin)(x), QuantLinear.from_float(lin, per_channel=False)(x)
    assert sqnr_db(ref, per_channel) >= 40.0 and sqnr_db(ref, per_channel) - sqnr_db(ref, per_tensor) >= 8.0
    assert sqnr_db(ref[:, small], per_channel[:, small]) - sqnr_db(ref[:, small], per_tensor[:, small]) >= 25.0


@pytest.mark.parametrize("config, min_db", [({}, 40.0), ({"activations": "dynamic"}, 30.0), (STATIC, 36.0)])
@pytest.mark.parametrize("geometry", [{"padding": 1}, {"stride": 2, "groups": 4, "dilation": 2}])
def test_conv_sqnr_vs_float(config: dict[str, Any], min_db: float, geometry: dict[str, Any]) -> None:
    torch.manual_seed(0)
    conv, x = nn.Conv2d(16, 32, 3, **geometry), _x(4, 16, 12, 12)
    m = QuantConv2d.from_float(conv, **config)
    with torch.no_grad():
        assert sqnr_db(conv(x), m(x)) >= min_db
        assert m(x[0]).shape == conv(x[0]).shape  # unbatched (C, H, W) input


def _save_and_reload(m: nn.Module, tmp_path: Path) -> nn.Module:
    path = skio.save(m, tmp_path / "q")
    spec = json.loads(json.dumps(m.spec()))  # the spec travels as JSON
    fresh = build_quant_module(spec)
    skio.load_into(fresh, skio.load_state(path))
    return fresh


@pytest.mark.parametrize("config", [{"bits": 8}, {"bits": 8, "per_channel": False}, {"bits": 4, "group_size": 64},
                                    {"activations": "dynamic"}, STATIC])
def test_linear_state_dict_round_trip_is_bit_identical(config: dict[str, Any], tmp_path: Path) -> None:
    m = QuantLinear.from_float(_linear(), **config)
    fresh = _save_and_reload(m, tmp_path)
    assert fresh.spec() == m.spec() and fresh.kernel == m.kernel
    for x in (_x(5, K), _x(200, K)):  # below and above the kernel's row threshold
        with torch.no_grad():
            assert torch.equal(fresh(x), m(x))


@pytest.mark.parametrize("config", [{}, {"activations": "dynamic"}, STATIC])
def test_conv_state_dict_round_trip_is_bit_identical(config: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding="same"), **config)
    fresh = _save_and_reload(m, tmp_path)
    x = _x(2, 8, 10, 10)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_whole_model_round_trip_through_slimkit_io(tmp_path: Path) -> None:
    """``slimkit.io`` records each quantized layer's spec and rebuilds it on load (registered classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(),
                          nn.Linear(32, 10)).eval()
    blank = copy.deepcopy(model)
    model[0] = QuantConv2d.from_float(model[0], activations="dynamic")
    model[3] = QuantLinear.from_float(model[3], activations="static", act_range=(0.0, 3.0), symmetric_act=False)
    model[5] = QuantLinear.from_float(model[5], bits=4, group_size=32)
    loaded = skio.load(skio.save(model, tmp_path / "m"), model=blank)
    assert [type(m).__name__ for m in loaded] == [type(m).__name__ for m in model]
    x = _x(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_saved_weights_are_smaller(tmp_path: Path) -> None:
    lin = _linear(1536, 384)

    def file_bytes(module: nn.Module, name: str) -> int:
        return (skio.save(module, tmp_path / name) / skio.WEIGHTS).stat().st_size

    fp32 = file_bytes(lin, "fp32")
    assert fp32 / file_bytes(QuantLinear.from_float(lin), "int8") >= 3.9
    assert fp32 / file_bytes(QuantLinear.from_float(lin, bits=4, group_size=64), "g64") >= 6.0
    assert fp32 / file_bytes(QuantLinear.from_float(lin, bits=4, group_size=128), "g128") >= 6.8
    int4 = QuantLinear.from_float(lin, bits=4, group_size=64)
    assert int4.qweight.numel() * int4.qweight.element_size() == 384 * 1536 // 2


@pytest.mark.parametrize("per_channel", [True, False])
def test_to_float_requantizes_to_the_same_integers(per_channel: bool) -> None:
    m = QuantLinear.from_float(_linear(), per_channel=per_channel)
    q, scale = pack.quantize_weight_int8(m.to_float().weight, per_channel)
    assert torch.equal(q, m.qweight)
    torch.testing.assert_close(scale, m.weight_scale, rtol=1e-6, atol=0)
    torch.manual_seed(0)
    conv = QuantConv2d.from_float(nn.Conv2d(8, 16, 3), per_channel=per_channel)
    float_conv = conv.to_float()
    assert torch.equal(pack.quantize_weight_int8(float_conv.weight, per_channel)[0], conv.qweight)
    assert torch.equal(float_conv.bias, conv.bias)


@pytest.mark.parametrize("bits, group_size", [(8, 0), (4, 64), (4, 128)])
def test_weight_kernel_matches_dequantized_matmul(bits: int, group_size: int) -> None:
    m = QuantLinear.from_float(_linear(), bits=bits, group_size=group_size)
    assert m.kernel.startswith("aten._weight_int") and m.fallback_reason is None
    with torch.no_grad():
        for rows in (1, 16, DEQUANT_ABOVE_M[bits] + 1):
            x = _x(rows, K)
            ref = F.linear(x, m.dequantized_weight(), m.bias)
            y = m(x)
            assert sqnr_db(ref, y) >= 45.0  # bf16 activations in the kernel
            assert (y - ref).abs().max() <= 0.02 * ref.abs().max()
        assert torch.equal(m(x), ref)  # above the threshold it *is* dequantize + matmul


@pytest.mark.parametrize("config", [{"bits": 8}, {"bits": 4, "group_size": 64}, {"activations": "dynamic"}, STATIC])
def test_three_d_inputs_and_dtypes(config: dict[str, Any]) -> None:
    m = QuantLinear.from_float(_linear(), **config)
    x = _x(3, 7, K)  # (B, T, K)
    with torch.no_grad():
        y = m(x)
        assert y.shape == (3, 7, N)
        assert torch.equal(y, m(x.reshape(21, K)).reshape(3, 7, N))
        assert m(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(SlimkitError, match="expects"):
        m(_x(2, K + 1))


def _without(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    real = _kernels.op
    monkeypatch.setattr(_kernels, "op", lambda ns, name: None if name == missing else real(ns, name))


@pytest.mark.parametrize("missing, config, fallback, min_db", [
    ("_weight_int8pack_mm", {"bits": 8}, "dequant-fp32", 40.0),
    ("_weight_int4pack_mm_for_cpu", {"bits": 4, "group_size": 64}, "dequant-fp32", 21.0),
    ("_convert_weight_to_int4pack_for_cpu", {"bits": 4, "group_size": 64}, "dequant-fp32", 21.0),
    ("linear_dynamic", {"activations": "dynamic"}, "fake-quant+dequant-fp32", 34.0),
])
def test_missing_kernel_falls_back_with_reason(monkeypatch: pytest.MonkeyPatch, missing: str, config: dict[str, Any],
                                               fallback: str, min_db: float) -> None:
    _without(monkeypatch, missing)
    lin, x = _linear(), _x(8, K)
    m = QuantLinear.from_float(lin, **config)
    assert m.kernel == fallback and missing in m.fallback_reason
    with torch.no_grad():
        assert sqnr_db(lin(x), m(x)) >= min_db


def test_missing_conv_kernel_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "qconv2d_pointwise")
    torch.manual_seed(0)
    conv, x = nn.Conv2d(8, 16, 3), _x(2, 8, 9, 9)
    m = QuantConv2d.from_float(conv, activations="dynamic")
    assert m.kernel == "fake-quant+dequant-fp32" and "qconv2d_pointwise" in m.fallback_reason
    with torch.no_grad():
        assert sqnr_db(conv(x), m(x)) >= 34.0


def test_weight_only_conv_says_why_it_is_fp32() -> None:
    m = QuantConv2d.from_float(nn.Conv2d(3, 4, 3))
    assert m.kernel == "dequant-fp32" and "ONNX Runtime" in m.fallback_reason


def test_static_integer_kernels_with_vnni_match_the_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """With VNNI the oneDNN integer kernels run the static path; they must equal the emulation.

    Inputs in [0, 0.2] with an asymmetric [0, 1] range keep uint8 levels <= 51, so the u8*s8
    pair sums cannot saturate even on this CPU: the integer result is exact.
    """
    monkeypatch.setattr(_kernels, "cpu_has_vnni", lambda: True)
    config = {"activations": "static", "act_range": (0.0, 1.0), "symmetric_act": False}
    lin, x = _linear(), _x(16, K).abs().clamp(max=0.2)
    real = QuantLinear.from_float(lin, **config)
    assert real.kernel == "onednn.qlinear_pointwise" and real.fallback_reason is None
    torch.manual_seed(0)
    conv, xc = nn.Conv2d(8, 16, 3, padding=1), _x(2, 8, 9, 9).abs().clamp(max=0.2)
    real_conv = QuantConv2d.from_float(conv, **config)
    assert real_conv.kernel == "onednn.qconv2d_pointwise"
    with torch.no_grad():
        emulated = F.linear(real._fake_quant(x), real.dequantized_weight(), real.bias)
        assert sqnr_db(emulated, real(x)) >= 80.0
        emulated = F.conv2d(real_conv._fake_quant(xc), real_conv.dequantized_weight(), real_conv.bias, padding=1)
        assert sqnr_db(emulated, real_conv(xc)) >= 80.0


def test_static_without_vnni_is_an_emulation_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_kernels, "cpu_has_vnni", lambda: False)
    m = QuantLinear.from_float(_linear(), **STATIC)
    assert m.kernel.startswith("fake-quant+") and "VNNI" in m.fallback_reason
    assert m.act_scale.dtype == torch.float32 and m.act_zero.dtype == torch.int32 and m.act_zero.shape == ()
    assert pack.act_qparams(*m.act_range(), symmetric=True) == (m.act_scale, m.act_zero)


def test_loading_new_weights_drops_cached_repacks() -> None:
    a = QuantLinear.from_float(_linear(seed=0), bits=4, group_size=64)
    b = QuantLinear.from_float(_linear(seed=1), bits=4, group_size=64)
    x = _x(4, K)
    with torch.no_grad():
        a(x)  # fills a's repack cache
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))
        dyn = QuantLinear.from_float(_linear(), activations="dynamic")
        dyn(x)
        twin = copy.deepcopy(dyn)  # the fbgemm ScriptObject cache is not copied, it is rebuilt
        assert torch.equal(twin(x), dyn(x))
        assert torch.equal(pickle.loads(pickle.dumps(dyn))(x), dyn(x))
    assert "_cache" not in "".join(a.state_dict())


def test_bad_configurations_are_refused() -> None:
    lin = _linear()
    for kwargs, match in [({"bits": 3}, "bits"), ({"bits": 4, "group_size": 64, "activations": "dynamic"}, "int4"),
                          ({"bits": 8, "group_size": 64}, "group"), ({"activations": "static"}, "act_range"),
                          ({"activations": "weird"}, "activations"), ({"bits": 4, "group_size": 96}, "group size")]:
        with pytest.raises(SlimkitError, match=match):
            QuantLinear.from_float(lin, **kwargs)
    with pytest.raises(SlimkitError, match="padding"):
        QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(SlimkitError, match="kind"):
        build_quant_module({"kind": "QuantLSTM"})
    with pytest.raises(SlimkitError, match="malformed"):
        build_quant_module({"kind": "QuantLinear", "in_features": 8})
