"""PTQ end to end on a table of tiny models (PEFT habit) and on the real digits task."""

import copy
import logging

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.core.task import Task
from slimkit.quantize import Int8, QuantConv2d, QuantLinear, WeightOnly, layer_errors
from slimkit.quantize.extreme_modules import BitConv2d
from tests.conftest import sqnr_db


class TinyAttention(nn.Module):
    """One pre-norm self-attention block + MLP on (B, T, 32) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 32)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)  # (B, T, 32) each
        att = torch.softmax(q @ k.transpose(1, 2) / 32 ** 0.5, dim=-1)  # (B, T, T)
        x = x + self.out(att @ v)
        return x + self.down(torch.relu(self.up(x)))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


MODELS = {"mlp": (_mlp, (16,)), "cnn": (_cnn, (3, 8, 8)), "attention": (TinyAttention, (6, 32))}
# (config, minimum output SQNR in dB vs float). Weight-only int4 loses ~6 dB per bit vs int8.
CONFIGS = {
    "int8-dynamic": (Int8(backend="torch"), 28.0),
    "int8-dynamic-per-tensor": (Int8(granularity="per_tensor", backend="torch"), 25.0),
    "int8-static-minmax": (Int8(activations="static", calibration="minmax", backend="torch"), 25.0),
    "int8-static-mse": (Int8(activations="static", calibration="mse", backend="torch"), 25.0),
    "int8-static-asym": (Int8(activations="static", calibration="percentile", symmetric=False, backend="torch"), 25.0),
    "w8": (WeightOnly(bits=8), 35.0),
    "w4-g32": (WeightOnly(bits=4, group_size=32), 14.0),
}


def _task(model: nn.Module, shape: tuple[int, ...]) -> Task:
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, *shape, generator=gen),) for _ in range(4)]
    return Task(name="tiny", model=model, example=calib[0], metric=lambda run, d: 0.0, eval=None, calib=calib)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_quantized_output_sqnr(model_name, config_name):
    build, shape = MODELS[model_name]
    config, min_sqnr = CONFIGS[config_name]
    torch.manual_seed(0)
    model = build().eval()
    task = _task(model, shape)
    if isinstance(config, WeightOnly) and model_name == "cnn":
        config = WeightOnly(bits=config.bits, group_size=config.group_size if config.bits == 4 else 0)
    q = sk.apply(model, config, task)
    n_quant = sum(isinstance(m, (QuantLinear, QuantConv2d, BitConv2d)) for m in q.modules())
    expected = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())  # WeightOnly takes convs too
    skipped = last_record(q).skipped
    assert n_quant == len(last_record(q).layers) and n_quant + len(skipped) == expected
    assert all("not a multiple of group_size" in why for why in skipped.values())
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert sqnr_db(model(x), q(x)) >= min_sqnr


def test_artifact_round_trip_is_bit_identical_and_4x_smaller(digits_task, tmp_path):
    q = sk.apply(digits_task.model, Int8(), digits_task)
    path = sk.save(q, tmp_path / "q", recipe=[Int8().to_dict()])
    loaded = sk.load(path)
    x = torch.cat([b[0][0] for b in digits_task.eval])
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))
    full = sk.io.artifact_bytes(sk.save(digits_task.model, tmp_path / "f"))
    assert full / sk.io.artifact_bytes(path) >= 3.3  # BN statistics, biases, scales and the header stay
    assert abs(digits_task.evaluate(loaded)["score"] - digits_task.evaluate()["score"]) <= 0.01


def test_int4_artifact_is_about_8x_smaller_on_linear_weights(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False))
    q = sk.apply(model, WeightOnly(bits=4, group_size=128))
    ratio = sk.io.artifact_bytes(sk.save(model, tmp_path / "f")) / sk.io.artifact_bytes(sk.save(q, tmp_path / "q"))
    assert 6.5 < ratio < 8.0  # 4 bits + one fp32 scale and zero per 128 weights = 4.5 bits


def _plant_sensitive_first_conv(model: nn.Module, channel: int = 3, factor: float = 1000.0) -> nn.Module:
    """Scale one output channel of the first conv by ``factor`` and undo it in the BN that follows.

    The float function is unchanged, but a per-tensor int8 scale for that conv is now set by the
    one giant channel, so every other channel rounds to ~0: layer "0" becomes the sensitive one.
    """
    m = copy.deepcopy(model)
    conv, bn = m[0], m[1]
    with torch.no_grad():
        conv.weight[channel] *= factor
        conv.bias[channel] *= factor
        bn.running_mean[channel] *= factor
        bn.running_var[channel] *= factor ** 2
    return m


def test_accuracy_control_reverts_the_planted_sensitive_layer(digits_task):
    planted = _plant_sensitive_first_conv(digits_task.model)
    task = copy.copy(digits_task)
    task.model = planted
    base = task.evaluate()["score"]
    assert base >= 0.97
    plain = sk.apply(planted, Int8(granularity="per_tensor", backend="torch"), task)
    assert task.drop(base, task.evaluate(plain)["score"]) > 0.1  # the plant really breaks per-tensor int8
    controlled = sk.apply(planted, Int8(granularity="per_tensor", backend="torch", max_drop=0.01), task)
    info = last_record(controlled)
    assert info.reverted[0] == "0"
    assert isinstance(controlled[0], nn.Conv2d) and isinstance(controlled[3], QuantConv2d)
    assert task.drop(base, task.evaluate(controlled)["score"]) <= 0.01
    assert info.history[-1]["drop"] <= 0.01
    assert max(info.sensitivity, key=info.sensitivity.get) == "0"


def test_unsupported_layer_is_skipped_with_a_logged_reason(caplog):
    model = nn.Sequential(nn.ConvTranspose1d(4, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    with caplog.at_level(logging.INFO, logger="slimkit.quantize"):
        q = sk.apply(model, Int8(targets=("0", "2"), backend="torch"))
    assert last_record(q).skipped == {"0": "ConvTranspose1d is not supported by this technique"}
    assert "kept in float: 0" in caplog.text
    assert isinstance(q[0], nn.ConvTranspose1d) and isinstance(q[2], QuantLinear)


def test_mask_like_activation_ranges_stay_float():
    model = nn.Sequential(nn.Linear(4, 4), nn.Hardtanh(), nn.Linear(4, 4))
    calib = [(torch.tensor([[0.0, -1e9, 1.0, 2.0]]),)]  # an additive-mask-like input
    task = Task(name="m", model=model, example=calib[0], metric=lambda r, d: 0.0, eval=None, calib=calib)
    q = sk.apply(model, Int8(activations="static", backend="torch"), task)
    assert "0" in last_record(q).skipped and "mask-like" in last_record(q).skipped["0"]
    assert isinstance(q[0], nn.Linear) and isinstance(q[2], QuantLinear)


@pytest.mark.parametrize("calib,message", [
    ([], "needs calibration data"),
    ([(torch.tensor([[float("nan"), 0.0, 1.0, 2.0]]),)], "NaN"),
])
def test_empty_or_nan_calibration_is_a_clear_error(calib, message):
    model = nn.Sequential(nn.Linear(4, 4))
    task = Task(name="m", model=model, example=(torch.zeros(1, 4),), metric=lambda r, d: 0.0, eval=None, calib=calib)
    with pytest.raises(sk.SlimkitError, match=message) as info:
        sk.apply(model, Int8(activations="static"), task)
    assert "\n" not in str(info.value)


def test_layer_errors_rank_the_planted_layer_worst(digits_task):
    planted = _plant_sensitive_first_conv(digits_task.model)
    q = sk.apply(planted, Int8(granularity="per_tensor", backend="torch"))
    rows = layer_errors(planted, q, digits_task.calib)
    assert rows[0].name == "0" and rows[0].worst_channel_sqnr_db < 10
    assert rows[0].sqnr_db > 30  # the overall SQNR alone would hide the damage
    assert all(r.worst_channel_sqnr_db > 15 for r in rows[1:])
    assert rows[0].sample.numel() > 0 and rows[0].max_abs > 0


@pytest.mark.parametrize("kwargs,message", [
    ({"activations": "semi"}, "activations='semi' is not supported"),
    ({"calibration": "kl"}, "calibration='kl' is not supported"),
    ({"percentile": 10.0}, "percentile=10.0 is out of range"),
])
def test_invalid_int8_options(kwargs, message):
    with pytest.raises(sk.SlimkitError, match=message):
        Int8(**kwargs)


@pytest.mark.parametrize("config", [Int8, WeightOnly])
def test_negative_max_drop_is_refused_by_both_quantizers(config):
    with pytest.raises(sk.SlimkitError, match="max_drop=-0.01 is negative"):
        config(max_drop=-0.01)
