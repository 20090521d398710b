"""AWQ int4: better output SQNR than round-to-nearest where a few input channels carry large
activations, an exact float fold, the same int4 storage as RTN, save/load, recipe replay, clear errors."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.pipeline.recipe import Recipe
from slimkit.quantize import QuantLinear, WeightOnly
from slimkit.quantize.awq import scale_and_fold

K, HIDDEN = 64, 128


def salient_task(seed: int = 0) -> sk.Task:
    """LayerNorm -> Linear -> ReLU -> Linear; 4 LayerNorm channels and 4 hidden channels 20-50x larger."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.LayerNorm(K), nn.Linear(K, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 32))
    big = torch.tensor([20.0, 30.0, 40.0, 50.0])
    with torch.no_grad():
        for layer in (model[1], model[3]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.in_features ** 0.5)
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))
        model[0].bias.copy_(0.1 * torch.randn(K, generator=g))
        model[0].weight[torch.randperm(K, generator=g)[:4]] = big  # salient inputs of the first Linear
        model[1].weight[torch.randperm(HIDDEN, generator=g)[:4]] *= big[:, None]  # ... and of the second
    x = torch.randn(256, K, generator=g)  # (B, K)
    calib = [(x[i:i + 64],) for i in range(0, 256, 64)]
    return sk.Task(name="salient", model=model.eval(), example=calib[0], metric=lambda run, data: {"score": 0.0},
                   eval=None, calib=calib)


def sqnr_db(reference: torch.Tensor, got: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (reference - got).norm()))


@pytest.fixture(scope="module")
def task() -> sk.Task:
    return salient_task()


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return torch.randn(256, K, generator=torch.Generator().manual_seed(9))  # (B, K), not the calibration inputs


def quantized(task: sk.Task, method: str, group_size: int) -> nn.Module:
    return sk.apply(copy.deepcopy(task.model), WeightOnly(bits=4, group_size=group_size, method=method), task)


# Measured SQNR (dB) of the output vs fp32 on held-out inputs, rtn / gptq / awq / awq+gptq:
#   g32: 17.0 / 18.6 / 29.3 / 31.3   g64: 15.5 / 16.9 / 27.4 / 30.4   g128: 21.5 / 31.4 / 28.8 / 40.5
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_beats_round_to_nearest_and_awq_gptq_keeps_up_with_gptq(task, held_out, group_size):
    with torch.no_grad():
        reference = task.model(held_out)
        db = {m: sqnr_db(reference, quantized(task, m, group_size)(held_out)) for m in ("rtn", "gptq", "awq", "awq+gptq")}
    assert db["awq"] >= db["rtn"] + 3.0
    assert db["awq+gptq"] >= db["gptq"] - 0.5


def test_the_fold_alone_keeps_the_float_function(task, held_out):
    reference, model = copy.deepcopy(task.model).double(), copy.deepcopy(task.model).double()
    double_task = copy.copy(task)
    double_task.calib = [tuple(t.double() for t in batch) for batch in task.calib]
    _, alphas, reasons = scale_and_fold(model, ["1", "3"], double_task, 32, gptq=False)
    assert reasons == {} and set(alphas) == {"1", "3"} and all(a > 0 for a in alphas.values())
    assert not torch.equal(model[1].weight, reference[1].weight)  # the weights did change
    with torch.no_grad():
        assert float((model(held_out.double()) - reference(held_out.double())).abs().max()) <= 1e-5


def test_awq_stores_plain_int4_of_the_same_bytes_as_rtn_and_saves_and_loads(task, held_out, tmp_path):
    awq, rtn = quantized(task, "awq", 64), quantized(task, "rtn", 64)
    assert isinstance(awq[1], QuantLinear) and awq[1].bits == 4 and awq[1].group_size == 64
    sizes = [{k: (v.dtype, v.numel()) for k, v in m.state_dict().items()} for m in (awq, rtn)]
    assert sizes[0] == sizes[1]
    sk.save(awq, tmp_path / "awq"), sk.save(rtn, tmp_path / "rtn")
    files = [sorted((p.name, p.stat().st_size) for p in (tmp_path / d).glob("*.safetensors")) for d in ("awq", "rtn")]
    assert files[0] == files[1] and files[0]
    loaded = sk.load(tmp_path / "awq", copy.deepcopy(rtn))  # the same int4 layout: RTN's module takes AWQ's tensors
    with torch.no_grad():
        assert torch.equal(loaded(held_out), awq(held_out))
    assert last_record(awq).config["method"] == "awq"


def test_recipe_replay_equals_apply(task, held_out):
    config = WeightOnly(bits=4, group_size=32, method="awq+gptq")
    replayed = Recipe.from_steps([config.to_dict()], task=task.name).replay(task)
    with torch.no_grad():
        assert torch.equal(replayed(held_out), quantized(task, "awq+gptq", 32)(held_out))


def test_layers_without_a_foldable_producer_are_rounded_unscaled_and_listed(caplog):
    """Nothing before the first Linear; a GELU (not scale-equivariant) before the second: both are only clipped."""
    model = nn.Sequential(nn.Linear(K, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, 8)).eval()
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(3))
    task = sk.Task(name="gelu", model=model, example=(x,), metric=lambda r, d: {"score": 0.0}, eval=None, calib=[(x,)])
    with caplog.at_level(logging.INFO, logger="slimkit.quantize.awq"):
        awq = sk.apply(copy.deepcopy(model), WeightOnly(bits=4, group_size=32, method="awq"), task)
    rtn = sk.apply(copy.deepcopy(model), WeightOnly(bits=4, group_size=32, method="rtn"), task)
    with torch.no_grad():  # unscaled, only clipped: never further from fp32 than round-to-nearest here
        ref = model(x)
        assert sqnr_db(ref, awq(x)) >= sqnr_db(ref, rtn(x)) - 0.05
    listed = [r.getMessage() for r in caplog.records if "rounded without scaling" in r.getMessage()]
    assert len(listed) == 2 and {m.split()[1] for m in listed} == {"0", "2"}


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_needs_calibration_data(method):
    with pytest.raises(SlimkitError, match="needs calibration data") as err:
        sk.apply(nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 8)), WeightOnly(bits=4, group_size=32, method=method))
    assert "\n" not in str(err.value) and "method='rtn'" in str(err.value)


def test_awq_is_for_int4():
    with pytest.raises(SlimkitError, match="4-bit"):
        WeightOnly(bits=8, method="awq")
    assert WeightOnly.from_dict(WeightOnly(bits=4, group_size=128, method="awq+gptq").to_dict()).method == "awq+gptq"
