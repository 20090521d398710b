"""Layer sensitivity finds planted sensitive layers; Hutchinson matches the exact Hessian trace."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task, accuracy
from slimkit.measure.sensitivity import (
    compressed_weight,
    hessian_trace,
    layer_sensitivity,
    ranked,
    render_sensitivity,
    report_sensitivity,
)


def _planted() -> tuple[nn.Module, Task]:
    """A 3-layer MLP; layer "2" gets one huge weight per row on an input that is always 0 (a dead ReLU), so
    the float function is unchanged but int4 groups there lose every other weight; half of layer "4"'s
    weights are zero already, so pruning 50 % there changes nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0  # unit 0 is always 0 after the ReLU
        model[2].weight[:, 0] = 40.0 * model[2].weight.abs().max()  # (64,) outliers on the dead input
        model[4].weight[:, ::2] = 0.0
    x = torch.randn(512, 64)
    with torch.no_grad():
        labels = model(x).argmax(-1)  # the float model is right on every sample
    batches = [((x[i:i + 128],), labels[i:i + 128]) for i in range(0, 512, 128)]
    task = Task(name="planted", model=model, example=(x[:4],), metric=accuracy, eval=batches,
                calib=[b[0] for b in batches], train=batches, loss=F.cross_entropy)
    return model, task


def test_quantize_sensitivity_finds_the_planted_layer():
    model, task = _planted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = layer_sensitivity(model, task, kind="quantize", bits=4)
    assert ranked(sens)[0][0] == "2"
    assert sens["2"] > 0.3  # most predictions flip
    assert sens["2"] > sens["4"] + 0.1 and sens["2"] > sens["0"] + 0.3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored exactly
    out = layer_sensitivity(model, task, kind="quantize", bits=4, measure="output")
    assert ranked(out)[0][0] == "2" and out["2"] > 10 * max(out["0"], out["4"])


def test_prune_sensitivity_spares_the_already_sparse_layer():
    model, task = _planted()
    sens = layer_sensitivity(model, task, kind="prune", ratio=0.5, measure="output")
    assert sens["4"] == 0.0  # only exact zeros are removed
    assert sens["0"] > 0.01


def test_int8_weights_are_the_deployed_integers():
    from slimkit.quantize import QuantLinear

    lin = nn.Linear(64, 16)
    got = compressed_weight(lin.weight.detach(), "quantize", bits=8)
    assert torch.equal(got, QuantLinear.from_float(lin, bits=8).dequantized_weight())
    got4 = compressed_weight(lin.weight.detach(), "quantize", bits=4)
    assert torch.equal(got4, QuantLinear.from_float(lin, bits=4, group_size=32).dequantized_weight())


def test_int4_group_size_is_the_deployed_one_and_coarser_groups_are_noisier(one_thread):
    from slimkit.quantize import QuantLinear

    torch.manual_seed(0)
    lin = nn.Linear(256, 32)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 256) * torch.randn(32, 256).abs() / 16)  # heavy tails, like trained weights
    for g in (64, 128, 0):
        got = compressed_weight(lin.weight.detach(), "quantize", bits=4, group_size=g)
        assert torch.equal(got, QuantLinear.from_float(lin, bits=4, group_size=g).dequantized_weight())
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(64, 256)
    task = Task(name="tiny", model=model, example=(x,), metric=accuracy, eval=[((x,), torch.zeros(64).long())],
                calib=[(x,)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noise = {g: layer_sensitivity(model, task, bits=4, layers=["0"], measure="output", group_size=g)["0"]
             for g in (32, 128)}
    assert noise[128] > 1.3 * noise[32] > 0  # fewer scales, wider ranges per group: more rounding noise
    assert layer_sensitivity(model, task, bits=4, layers=["0"], measure="output")["0"] == noise[32]  # default
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SlimkitError, match="group_size"):
        layer_sensitivity(model, task, bits=4, measure="output", group_size=3)


def test_hutchinson_matches_the_exact_trace(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    task = Task(name="tiny", model=model, example=(x,), metric=accuracy, eval=[((x,), y)], train=[((x,), y)],
                loss=F.cross_entropy)
    w0 = model[0].weight

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, w, model[0].bias))
        return F.cross_entropy(model[2](h), y)

    exact = float(torch.autograd.functional.hessian(loss_of, w0.detach()).reshape(w0.numel(), -1).trace())
    est = hessian_trace(model, task, samples=400, batches=1)
    assert est["0"] == pytest.approx(exact, rel=0.1)
    assert set(est) == {"0", "2"}


def test_render_and_report(tmp_path):
    from slimkit.report.html import Report

    sens = {"a": 0.1, "b": 0.5}
    assert render_sensitivity(sens).row_count == 2
    report = Report("s")
    report_sensitivity(report, sens)
    report.write(tmp_path)
    assert report.data["sensitivity"]["Layer sensitivity"] == sens
    assert "<img" in (tmp_path / "report.html").read_text()


def test_bad_input_is_one_line():
    model, task = _planted()
    with pytest.raises(SlimkitError, match="not a Linear or Conv2d"):
        layer_sensitivity(model, task, layers=["1"])
    with pytest.raises(SlimkitError, match="kind"):
        layer_sensitivity(model, task, kind="distill")
