"""Every technique through the same generic tests, as a table over tiny models (``tests/models.py``).

A row is (config, model, checks). Each row gets: the config's JSON and YAML round trip; apply
(shapes kept, the output's closeness to the original at least ``min_cosine``, the artifact at
most ``max_size`` of the original's bytes); save -> load giving identical outputs; every runtime
the row claims giving the torch model's outputs; and the recipe replaying to bit-identical
outputs. Adding a technique adds rows here, not a test file.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import pytest
import torch
import torch.nn as nn
import yaml

import slimkit as sk
from slimkit.core.config import BaseConfig
from slimkit.core.record import records_of
from slimkit.core.registry import all_techniques
from slimkit.measure import artifact_size
from slimkit.measure.closeness import cosine
from slimkit.pipeline.recipe import Recipe
from slimkit.runtime import build
from tests.models import MODELS, cnn, depthwise_cnn, encoder, mha, mlp, residual_cnn, sequence, tiny_task, unet


@dataclasses.dataclass(frozen=True)
class Case:
    config: BaseConfig
    model: Callable[[], nn.Module]
    min_cosine: float                        # output of the result vs the original, on the example
    max_size: float | None = None            # artifact bytes of the result / the original's
    runtimes: tuple[str, ...] = ("torch",)   # each must reproduce the torch model's outputs
    runtime_cosine: float = 0.999
    #: A known gap, named: the reason save -> load is not yet exact for this row (the test is then a strict xfail).
    reload_gap: str | None = None

    @property
    def id(self) -> str:
        """Type, model and the options that differ from the defaults: unique per row."""
        default = type(self.config)()
        changed = [f"{f.name}={getattr(self.config, f.name)}" for f in dataclasses.fields(self.config)
                   if getattr(self.config, f.name) != getattr(default, f.name)]
        return "-".join([self.config.type_name, self.model.__name__, *changed])


Q, P, F, D, A, T = sk.quantize, sk.prune, sk.factorize, sk.distill, sk.architecture, sk.train
CASES = [
    Case(Q.Int8(), mlp, 0.999, 0.4, ("torch", "onnxruntime"), 0.995),
    Case(Q.Int8(), cnn, 0.999, 0.35, ("torch", "onnxruntime"), 0.99),
    Case(Q.Int8(activations="static", calibration="entropy"), cnn, 0.995, 0.35, ("torch", "onnxruntime"), 0.99),
    Case(Q.Int8(), encoder, 0.999, 0.45),
    Case(Q.Int8(), sequence, 0.999, 0.5),  # the Conv1d as a (k, 1) Conv2d, the LSTM's gate matrices int8 (torch)
    Case(Q.WeightOnly(bits=4, group_size=32), sequence, 0.99, 0.4),
    Case(Q.Int8(), mha, 0.999, runtimes=("torch", "onnxruntime")),  # the MultiheadAttention stays float (listed)
    Case(Q.WeightOnly(bits=4, group_size=32), mha, 0.99),
    Case(Q.WeightOnly(bits=8), mlp, 0.999, 0.4),
    Case(Q.WeightOnly(bits=8), unet, 0.999, 0.4),  # its ConvTranspose2d stored int8 too (QuantConvTranspose)
    Case(Q.WeightOnly(bits=4, group_size=32), mlp, 0.99, 0.32),
    Case(Q.WeightOnly(bits=4, group_size=32, method="gptq"), mlp, 0.995, 0.32),
    Case(Q.AdaRound(bits=4, iterations=50), cnn, 0.97, 0.35),  # int4 per output channel, every conv and Linear
    Case(Q.AdaRound(bits=8, iterations=50), sequence, 0.99, 0.5),  # Conv1d as (k, 1); LSTM int8, nearest (listed)
    Case(Q.Float16(), mlp, 0.9999, 0.55),
    Case(Q.BFloat16(), cnn, 0.999, 0.55),
    Case(Q.Mixed(budget_ratio=0.3), mlp, 0.999, 0.45),
    Case(Q.SmoothQuant(), encoder, 0.9999),  # float function kept (value -> output folded), size unchanged
    Case(Q.CrossLayerEqualization(), depthwise_cnn, 0.9999, 1.0, ("torch", "onnxruntime")),  # float function kept
    Case(Q.QAT(bits=8, steps=4, lr=1e-5), cnn, 0.999, 0.35),
    Case(Q.Ternary(steps=4, lr=1e-5), cnn, 0.99, 0.15),
    Case(Q.Binary(steps=4, lr=1e-5), mlp, 0.95, 0.3),
    Case(P.Magnitude(amount=0.3), mlp, 0.98, 0.9),
    Case(P.NM(), mlp, 0.95, 0.65),
    Case(P.NM(method="sparsegpt"), mlp, 0.99, 0.65),
    Case(P.Channels(amount=0.5, round_to=None), cnn, 0.95, 0.32),
    Case(P.Channels(amount=0.5, round_to=None), residual_cnn, 0.95, 0.42),
    Case(P.Channels(amount=0.5, round_to=None), depthwise_cnn, 0.93, 0.7),
    Case(P.Channels(amount=0.5, round_to=None), encoder, 0.99, 0.65),
    Case(P.Channels(amount=0.5, round_to=None), sequence, 0.9, 0.7),  # LSTM hidden units; the conv feeding it is kept
    Case(P.Channels(amount=0.5, round_to=None, reconstruct=True), cnn, 0.999, 0.32),
    Case(P.Gradual(amount=0.5, steps=20, prunings=2, lr=1e-4), mlp, 0.95, 0.7),
    Case(P.Lottery(amount=0.5, steps=6, lr=1e-4), mlp, 0.95, 0.7),
    Case(F.SVD(rank_ratio=0.5, keep_output=False), mlp, 0.9, 0.6),
    Case(F.SVD(rank_ratio=0.5, allocation="sensitivity", keep_output=False), mlp, 0.995, 0.6),
    Case(F.Tucker(ratio=0.5), cnn, 0.999, 0.6),
    Case(F.Tucker(ratio=0.5, allocation="sensitivity"), cnn, 0.97, 0.6),
    Case(F.CP(ratio=0.5), cnn, 0.999, 0.6),
    Case(F.CP(ratio=0.5, allocation="sensitivity"), cnn, 0.999, 0.6),
    Case(T.Finetune(steps=4, lr=1e-5), mlp, 0.999),
    Case(D.Distill(steps=4, lr=1e-5), mlp, 0.999),
    Case(D.Student(layers=1), encoder, 0.9, 0.6),
    Case(D.SimCSE(steps=4, lr=1e-5), encoder, 0.999),
    Case(A.Fuse(), cnn, 0.9999, 1.0, ("torch", "onnxruntime")),
    Case(A.EarlyExitConfig(steps=4, holdout=4), cnn, 0.8),
]
IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "two rows of the table are the same"


@pytest.fixture(scope="module")
def tasks() -> dict[str, sk.Task]:
    return {f.__name__: tiny_task(f) for f in (mlp, cnn, residual_cnn, depthwise_cnn, encoder, sequence, mha, unet)}


@pytest.fixture(scope="module")
def applied(tasks: dict[str, sk.Task]) -> dict[str, nn.Module]:
    """Each row applied once (seeded as a recipe replays it), shared by the tests below."""
    out = {}
    for case in CASES:
        torch.manual_seed(0)
        out[case.id] = sk.apply(tasks[case.model.__name__].model, case.config, tasks[case.model.__name__])
    return out


def _out(model: nn.Module | Callable, example: tuple) -> torch.Tensor:
    with torch.inference_mode():
        y = model(*example)
    return torch.as_tensor(y[0] if isinstance(y, (tuple, list)) else y).float()


def test_every_registered_technique_has_a_row():
    covered = {c.config.type_name for c in CASES}
    untested = {t.name for t in all_techniques() if not t.name.startswith("test.")} - covered
    # nas.* need their own model families (tests/nas); a StudentArtifact row needs a saved file (tests/distill)
    # quantize.BiasCorrection edits a quantize step's layers: tests/quantize/test_equalization.py
    assert untested == {"nas.CNN", "nas.Encoder", "distill.StudentArtifact", "quantize.BiasCorrection"}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_config_round_trips_json_and_yaml(case: Case):
    data = case.config.to_dict()
    assert BaseConfig.from_dict(json.loads(json.dumps(data))) == case.config
    assert BaseConfig.from_dict(yaml.safe_load(yaml.safe_dump(data))) == case.config


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_apply_keeps_shapes_and_stays_close(case: Case, tasks, applied):
    task, out = tasks[case.model.__name__], applied[case.id]
    ref, got = _out(task.model, task.example), _out(out, task.example)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    assert cosine(ref, got) >= case.min_cosine
    assert records_of(out) and records_of(out)[-1].technique == case.config.type_name
    if case.max_size is not None:
        assert artifact_size(out) <= case.max_size * artifact_size(task.model)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.xfail(reason=c.reload_gap, strict=True))
                                  if c.reload_gap else c for c in CASES], ids=IDS)
def test_save_then_load_gives_the_same_outputs(case: Case, tasks, applied, tmp_path):
    task, out = tasks[case.model.__name__], applied[case.id]
    sk.save(out, tmp_path / "model", recipe=[case.config.to_dict()])
    back = sk.load(tmp_path / "model")
    assert torch.equal(_out(back, task.example), _out(out, task.example))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_claimed_runtime_reproduces_the_torch_outputs(case: Case, tasks, applied):
    task, out = tasks[case.model.__name__], applied[case.id]
    reference = _out(out, task.example)
    for runtime in case.runtimes:
        assert cosine(reference, _out(build(out, runtime, task.example), task.example)) >= case.runtime_cosine


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recipe_replays_to_identical_outputs(case: Case, tasks, applied):
    task = tasks[case.model.__name__]
    recipe = Recipe.from_yaml(Recipe(steps=[case.config], task=task.name).to_yaml())
    assert torch.equal(_out(recipe.replay(task), task.example), _out(applied[case.id], task.example))


def _without(task: sk.Task, *fields: str) -> sk.Task:
    return dataclasses.replace(task, **{f: None if f in ("train", "loss") else [] for f in fields})


#: (config, model, fields the task lacks, what the one-line error says)
ERRORS = [
    (Q.Int8(activations="static"), mlp, ("calib",), "static int8 needs calibration data"),
    (Q.WeightOnly(bits=4, group_size=32, method="gptq"), mlp, ("calib",), "calibration"),
    (Q.SmoothQuant(), mlp, ("calib",), "SmoothQuant needs calibration data"),
    (Q.Int8(targets=("1",)), mlp, (), "no layer to quantize"),
    (Q.QAT(steps=2), cnn, ("train",), "QAT needs a task with training data"),
    (Q.Ternary(steps=2), cnn, ("train",), "needs a task with training data"),
    (P.Channels(reconstruct=True), cnn, ("calib",), "reconstruct=True needs calibration inputs"),
    (P.Channels(importance="taylor"), cnn, ("train",), "importance='taylor' needs labelled training batches"),
    (P.Channels(importance="bn_scale"), mlp, (), "needs BatchNorm layers"),
    (P.Gradual(steps=40, prunings=2), mlp, ("train",), "needs a task with training data"),
    (P.Lottery(steps=4), mlp, ("train",), "needs a task with training data"),
    (T.Finetune(steps=2), mlp, ("loss",), "Finetune needs a task with training data and a loss"),
    (D.Distill(steps=2), mlp, ("train",), "distillation needs a task with training inputs"),
    (D.SimCSE(steps=2), mlp, (), "needs dropout"),
    (D.Student(layers=1), mlp, (), "has no '<...>.encoder.layer'"),
    (A.EarlyExitConfig(steps=2, holdout=4), residual_cnn, (), "early exits need an nn.Sequential CNN"),
]


@pytest.mark.parametrize("config,model,lacks,message", ERRORS, ids=[f"{e[0].type_name}-{e[1].__name__}" for e in ERRORS])
def test_a_task_a_technique_cannot_use_is_one_line_error(config, model, lacks, message, tasks):
    task = _without(tasks[model.__name__], *lacks)
    with pytest.raises(sk.SlimkitError) as err:
        sk.apply(task.model, config, task)
    assert message in str(err.value) and "\n" not in str(err.value) and err.value.hint


@pytest.mark.parametrize("model,configs,layers", [
    (unet, (Q.Int8(),), {"up": "no integer transposed-conv kernel"}),  # WeightOnly stores it int8/int4
    (mha, (Q.Int8(),), {"mha": "reads its projection weights directly", "mha.out_proj": "reads this weight directly"}),
])
def test_layers_a_quantizer_leaves_float_are_listed_with_the_reason(model, configs, layers, tasks):
    task = tasks[model.__name__]
    for config in configs:
        skipped = records_of(sk.apply(task.model, config, task))[-1].skipped
        for name, why in layers.items():
            if why is not None:
                assert why in skipped[name], (config.type_name, name, skipped)



#: One quick config per technique for the grid below (training steps kept to a handful).
QUICK = [Q.Int8(), Q.Int8(activations="static"), Q.WeightOnly(bits=4, group_size=32), Q.Float16(), Q.Mixed(),
         Q.QAT(steps=2), Q.Ternary(steps=2), P.Magnitude(), P.NM(), P.Channels(round_to=None),
         P.Gradual(steps=20, prunings=2), P.Lottery(steps=2), F.SVD(), F.Tucker(), F.CP(iters=5),
         T.Finetune(steps=2), D.Distill(steps=2), A.Fuse(), A.EarlyExitConfig(steps=2, holdout=4),
         D.Student(layers=1), D.SimCSE(steps=2)]


@pytest.mark.parametrize("factory", MODELS, ids=[f.__name__ for f in MODELS])
def test_every_technique_on_every_model_works_or_says_why(factory):
    """Real-shaped models (Conv1d + LSTM, MultiheadAttention, ConvTranspose + upsample + pixel shuffle,
    depthwise, attention encoder): each technique works (finite outputs of the same shape) or refuses with
    a one-line SlimkitError. A raw exception from deep inside is a bug."""
    task = tiny_task(factory)
    with torch.inference_mode():
        reference = _out(task.model, task.example)
    for config in QUICK:
        torch.manual_seed(0)
        try:
            out = sk.apply(task.model, config, task)
        except sk.SlimkitError as exc:
            assert "\n" not in str(exc) and exc.hint, (config.type_name, str(exc))
            continue
        got = _out(out, task.example)
        assert got.shape == reference.shape and torch.isfinite(got).all(), config.type_name
