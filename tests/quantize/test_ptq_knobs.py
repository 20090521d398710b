"""Search knobs of the PTQ algorithms (CLE and bias correction around static int8, AWQ in WeightOnly's
method) and the per-layer SQNR before / after an algorithm."""

import optuna
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.registry import SearchContext, technique_named
from slimkit.core.task import Task
from slimkit.quantize import BiasCorrection, CrossLayerEqualization, Int8, WeightOnly
from slimkit.quantize.layer_error import layer_errors_before_after
from slimkit.search.optimize import suggest_pipeline
from tests.conftest import sqnr_db
from tests.quantize.test_equalization import PER_TENSOR, TEST_X, _mobile, _task


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NormMLP(nn.Module):
    """Linear -> LayerNorm -> two Linears reading the norm (a transformer's q/k/v pattern); input (B, 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(64, 64), nn.LayerNorm(64)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 64)
        h = self.norm(self.inp(x))
        return self.a(h) + self.b(h)


def relu6_net() -> nn.Module:
    """conv -> ReLU6 -> conv -> ReLU6 -> pool -> linear: CLE finds no pair (ReLU6 is not homogeneous)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def _ctx(model: nn.Module, calib: bool = True, example: tuple | None = None) -> SearchContext:
    if example is None:
        task = _task(model, calib)
    else:
        batches = [(torch.randn(*example, generator=torch.Generator().manual_seed(i)),) for i in range(4)]
        task = Task(name="tiny", model=model, example=batches[0], metric=lambda run, d: 0.0, eval=None,
                    calib=batches if calib else ())
    return SearchContext(task=task, target=None, baseline={})


STATIC = {"int8.activations": "static", "int8.calibration": "minmax"}
MODELS = {"mobile-relu": lambda: _ctx(_mobile(nn.ReLU)), "relu6": lambda: _ctx(relu6_net()),
          "no-calib": lambda: _ctx(_mobile(nn.ReLU), calib=False)}
# model, trial parameters -> the step types Int8.suggest returns (a knob not asked would raise in FixedTrial)
INT8_CASES = {
    "static, cle + bc": ("mobile-relu", {**STATIC, "int8.cle": True, "int8.bias_correction": True},
                         [CrossLayerEqualization, Int8, BiasCorrection]),
    "static, cle only": ("mobile-relu", {**STATIC, "int8.cle": True, "int8.bias_correction": False},
                         [CrossLayerEqualization, Int8]),
    "static, neither": ("mobile-relu", {**STATIC, "int8.cle": False, "int8.bias_correction": False}, [Int8]),
    "dynamic: no knob asked": ("mobile-relu", {"int8.activations": "dynamic"}, [Int8]),
    "relu6: cle not asked": ("relu6", {**STATIC, "int8.bias_correction": True}, [Int8, BiasCorrection]),
    "no calib: bc not asked": ("no-calib", {**STATIC, "int8.cle": True}, [CrossLayerEqualization, Int8]),
}


@pytest.mark.parametrize("case", INT8_CASES)
def test_int8_suggests_cle_and_bias_correction_where_they_act(case):
    model, params, types = INT8_CASES[case]
    ctx = MODELS[model]()
    trial = optuna.trial.FixedTrial(params)
    steps = technique_named("quantize.Int8").suggest(trial, ctx)
    steps = steps if isinstance(steps, list) else [steps]
    assert [type(s) for s in steps] == types
    asked = {k for k in ("int8.cle", "int8.bias_correction") if k in trial.params}
    assert asked == {k for k in params if k in ("int8.cle", "int8.bias_correction")}


def test_the_search_runs_the_suggested_cle_int8_bc_steps_in_order():
    """suggest_pipeline flattens Int8's steps; applied, they beat plain static int8 on the planted model."""
    ctx = MODELS["mobile-relu"]()
    params = {"stage.fuse": "none", "stage.quantize": "int8", **STATIC, "int8.cle": True, "int8.bias_correction": True}
    techs = [technique_named(n) for n in ("quantize.SmoothQuant", "quantize.Int8")]
    steps = suggest_pipeline(optuna.trial.FixedTrial(params), ctx, techs)
    assert [type(s) for s in steps] == [CrossLayerEqualization, Int8, BiasCorrection]
    model = ctx.task.model
    with torch.no_grad():
        reference = model(TEST_X)
        plain = sqnr_db(reference, sk.apply(model, steps[1], ctx.task)(TEST_X))
        tuned = sqnr_db(reference, sk.apply(model, steps, ctx.task)(TEST_X))
    assert tuned >= plain + 30.0  # measured 11.1 -> 48.0 dB (per-channel static int8, planted small channels)


# model, whether the task has calibration data -> the int4 methods WeightOnly's search offers
AWQ_CASES = {
    "layernorm model": (lambda: _ctx(NormMLP().eval(), example=(16, 64)), ("gptq", "rtn", "awq", "awq+gptq")),
    "cnn: no norm to fold into": (lambda: _ctx(_mobile(nn.ReLU)), ("gptq", "rtn")),
    "no calibration data": (lambda: _ctx(NormMLP().eval(), calib=False, example=(16, 64)), None),
}


@pytest.mark.parametrize("case", AWQ_CASES)
def test_weight_only_offers_awq_on_transformers_only(case):
    make, methods = AWQ_CASES[case]
    params = {"weight_only.bits": 4, "weight_only.group_size": 32, "weight_only.method": (methods or ("rtn",))[-1]}
    trial = optuna.trial.FixedTrial(params)
    config = technique_named("quantize.WeightOnly").suggest(trial, make())
    if methods is None:
        assert config.method == "rtn" and "weight_only.method" not in trial.params
    else:
        assert trial.distributions["weight_only.method"].choices == methods
        assert config == WeightOnly(bits=4, group_size=32, method=methods[-1])


def test_layer_errors_before_after_carry_both_sqnrs():
    """CLE + bias correction vs plain per-tensor int8 on the planted model: the pointwise conv reading the
    planted small channels gains most, bias correction lifts the head; every row carries its "before"."""
    model = _mobile(nn.ReLU)
    task = _task(model)
    plain = sk.apply(model, PER_TENSOR, task)
    tuned = sk.apply(model, [CrossLayerEqualization(), PER_TENSOR, BiasCorrection()], task)
    equalized = sk.apply(model, CrossLayerEqualization(), task)
    rows = {r.name: r for r in layer_errors_before_after(model, plain, tuned, task.calib, algorithm="CLE+BC",
                                                         float_improved=equalized)}
    assert set(rows) == {"conv0", "dw", "pw", "fc"}
    assert all(r.algorithm == "CLE+BC" and r.sqnr_before_db is not None for r in rows.values())
    gain = {n: r.sqnr_db - r.sqnr_before_db for n, r in rows.items()}
    assert gain["pw"] >= 30.0  # measured 1.7 -> 38.1 dB
    assert gain["fc"] >= 1.5  # measured 47.9 -> 50.4 dB (bias correction)
    assert abs(gain["dw"]) <= 1.0 and abs(gain["conv0"]) <= 0.5  # measured 37.8 -> 37.5, 39.7 -> 39.7 dB
    assert "sqnr_before_db" in rows["dw"].to_dict()
