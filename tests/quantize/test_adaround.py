"""AdaRound: never worse than nearest rounding on its own layer objective, better accuracy at int4 on a
trained CNN, exact save -> load and recipe replay, and one-line errors / listed skips."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import records_of
from slimkit.core.task import Task, accuracy
from slimkit.pipeline.recipe import Recipe
from slimkit.quantize.adaround import AdaRound, AdaRoundRecord
from tests.models import cnn, mha, mlp, sequence, tiny_task, unet

Q = sk.quantize


def _correlated(shape: tuple[int, ...], channels_dim: int, g: torch.Generator) -> torch.Tensor:
    """Post-ReLU-like inputs (non-zero mean, channels mixed) as real activations are: there rounding
    choices interact (on white zero-mean inputs nearest rounding is already optimal)."""
    x = torch.randn(*shape, generator=g)
    c = shape[channels_dim]
    mix = torch.randn(c, c, generator=g) / c ** 0.5 + torch.eye(c)  # (C, C)
    return (torch.movedim(torch.movedim(x, channels_dim, -1) @ mix, -1, channels_dim) + 0.5).relu()


def _one_layer(factory: Callable[[], nn.Module], shape: tuple[int, ...]) -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(factory()).eval()
    g = torch.Generator().manual_seed(1)
    xs = [_correlated(shape, 1 if len(shape) > 2 else -1, g) for _ in range(8)]
    labelled = [((x,), model(x).argmax(1)) for x in xs]
    return Task(name="one_layer", model=model, example=(xs[0],), metric=accuracy, eval=labelled[:2],
                calib=[(x,) for x in xs])


def _output_mse(model: nn.Module, task: Task) -> float:
    with torch.inference_mode():
        return float(torch.stack([(model(*b) - task.model(*b)).pow(2).mean() for b in task.calib]).mean())


#: (layer, input shape (batch first), config, most AdaRound's objective may be as a share of nearest's: the
#: measured share at 300 iterations plus a margin of ~0.08)
LAYERS = [
    (lambda: nn.Linear(48, 24), (64, 48), dict(bits=4), 0.65),
    (lambda: nn.Linear(64, 24), (64, 64), dict(bits=4, group_size=32), 0.65),
    (lambda: nn.Linear(48, 24), (64, 48), dict(bits=8), 0.6),
    (lambda: nn.Conv2d(8, 16, 3, padding=1), (8, 8, 10, 10), dict(bits=4), 0.66),
    (lambda: nn.Conv2d(8, 16, 3, padding=1), (8, 8, 10, 10), dict(bits=8, activations="dynamic"), 0.6),
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 8, 10, 10), dict(bits=4), 0.97),  # depthwise: 9 taps
    (lambda: nn.Conv2d(8, 16, 3, stride=2, groups=2), (8, 8, 11, 11), dict(bits=4), 0.6),  # grouped, strided
    (lambda: nn.Conv1d(8, 12, 5, padding=2), (8, 8, 24), dict(bits=4), 0.8),
]


@pytest.mark.parametrize("factory,shape,options,share", LAYERS,
                         ids=[f"{type(f()).__name__}-g{getattr(f(), 'groups', 1)}-{o}" for f, _, o, _ in LAYERS])
def test_adaround_is_never_worse_than_nearest_on_the_layer_objective(factory, shape, options, share):
    task = _one_layer(factory, shape)
    nearest = sk.apply(task.model, AdaRound(iterations=0, **options), task)
    learned = sk.apply(task.model, AdaRound(iterations=300, **options), task)
    record = records_of(learned)[-1]
    assert isinstance(record, AdaRoundRecord) and len(record.rounded) == 1
    before, after = next(iter(record.rounded.values()))
    assert after <= before * share  # the objective it optimises, on the float calibration inputs
    # measured independently: the whole layer's output error (bias, padding, activation rounding included;
    # with int8 activations their rounding noise dominates, so there only "not worse")
    assert _output_mse(learned, task) <= _output_mse(nearest, task) * (1.0 if "activations" in options else share)


def test_every_weight_rounds_up_or_down_from_the_float_one():
    task = _one_layer(lambda: nn.Linear(48, 24), (64, 48))
    w = task.model[0].weight.detach()
    for options in (dict(bits=4), dict(bits=8)):
        q = sk.apply(task.model, AdaRound(iterations=200, **options), task)[0].weight  # dequantized
        step = (w.abs().amax(1, keepdim=True) / (7 if options["bits"] == 4 else 127))  # (N, 1)
        assert float(((q - w).abs() / step).max()) <= 1.0 + 1e-4


@pytest.mark.slow
def test_per_channel_int4_with_adaround_keeps_digits_accuracy(digits_task):
    """Every layer (convs included) int4 per output channel on the trained digits CNN."""
    fp32 = digits_task.evaluate()["score"]
    nearest = digits_task.evaluate(sk.apply(digits_task.model, AdaRound(bits=4, iterations=0), digits_task))["score"]
    learned = sk.apply(digits_task.model, AdaRound(bits=4), digits_task)
    score = digits_task.evaluate(learned)["score"]
    assert score >= nearest and score >= fp32 - 0.01
    record = records_of(learned)[-1]
    assert len(record.rounded) == 5 and all(b <= a for a, b in record.rounded.values())


@pytest.mark.parametrize("factory,steps", [
    (cnn, [AdaRound(bits=4, iterations=20)]),
    pytest.param(cnn, [AdaRound(bits=8, activations="static", iterations=20)], marks=pytest.mark.slow),
    (cnn, [Q.Int8(activations="static"), AdaRound(iterations=20)]),
    (mlp, [Q.WeightOnly(bits=4, group_size=32), AdaRound(iterations=20)]),
], ids=["int4-per-channel", "int8-static", "after-Int8-static", "after-WeightOnly-int4"])
def test_save_load_and_recipe_replay_are_exact(factory, steps, tmp_path):
    task = tiny_task(factory)
    torch.manual_seed(0)
    out = sk.apply(task.model, steps, task)
    record = records_of(out)[-1]
    assert set(record.rounded) - set(record.kept_nearest)  # some layer really was re-rounded
    sk.save(out, tmp_path / "model", recipe=[s.to_dict() for s in steps])
    back = sk.load(tmp_path / "model")
    with torch.inference_mode():
        assert torch.equal(back(*task.example), out(*task.example))
    replayed = Recipe.from_yaml(Recipe(steps=steps, task=task.name).to_yaml()).replay(task)
    mine, theirs = out.state_dict(), replayed.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_after_a_quantize_step_it_improves_those_layers_and_skips_gptq_ones():
    task = tiny_task(mlp)
    plain = sk.apply(task.model, [Q.WeightOnly(bits=4, group_size=32), AdaRound(iterations=200)], task)
    record = records_of(plain)[-1]
    assert set(record.rounded) == {"0", "2", "4"}
    assert all(b <= a for a, b in record.rounded.values())
    gptq = sk.apply(task.model, [Q.WeightOnly(bits=4, group_size=32, method="gptq"), AdaRound()], task)
    assert all("GPTQ" in why for why in records_of(gptq)[-1].skipped.values()) and records_of(gptq)[-1].skipped


@pytest.mark.parametrize("factory,layers", [
    (sequence, {"lstm": "not re-rounded"}),          # int4 gate matrices stay round-to-nearest
    (unet, {"up": "not re-rounded"}),                # ConvTranspose2d
    (mha, {"mha": "MultiheadAttention"}),
])
def test_layers_it_cannot_take_are_listed_with_the_reason(factory, layers):
    task = tiny_task(factory)
    out = sk.apply(task.model, AdaRound(bits=4, group_size=32, iterations=20) if factory is not unet
                   else AdaRound(bits=8, iterations=20), task)
    skipped = records_of(out)[-1].skipped
    for name, why in layers.items():
        assert why in skipped[name], skipped
    assert records_of(out)[-1].rounded  # the Conv / Linear layers were re-rounded


def _nan_model() -> nn.Module:
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("config,change,message", [
    (AdaRound(bits=4), lambda t: Task(t.name, t.model, t.example, t.metric, t.eval), "needs calibration data"),
    (AdaRound(), lambda t: t, "found no quantized Conv/Linear layer"),
    (AdaRound(bits=4), lambda t: Task(t.name, _nan_model(), t.example, t.metric, t.eval, t.calib), "NaN"),
    (AdaRound(bits=8), lambda t: Task(t.name, _nan_model(), t.example, t.metric, t.eval, t.calib), "NaN"),
])
def test_bad_input_is_a_one_line_error(config, change, message):
    task = change(tiny_task(mlp))
    with pytest.raises(sk.SlimkitError) as err:
        sk.apply(task.model, config, task)
    assert message in str(err.value) and "\n" not in str(err.value) and err.value.hint


@pytest.mark.parametrize("options,message", [
    (dict(bits=3), "bits=3"), (dict(bits=4, activations="static"), "needs bits=8"),
    (dict(bits=8, group_size=32), "group_size is for bits=4"), (dict(iterations=-1), "iterations"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(sk.SlimkitError) as err:
        AdaRound(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("params,expected", [
    ({"adaround.bits": 4, "adaround.group_size": 0, "adaround.iterations": 200}, AdaRound(bits=4, iterations=200)),
    ({"adaround.bits": 8, "adaround.activations": "static", "adaround.iterations": 500},
     AdaRound(bits=8, activations="static")),
])
def test_search_knobs_give_valid_configs_and_need_calibration(params, expected):
    optuna = pytest.importorskip("optuna")
    from slimkit.core.registry import SearchContext
    from slimkit.core.target import Target

    task = tiny_task(cnn)
    ctx = SearchContext(task=task, target=Target(max_drop=0.01), baseline={})
    assert AdaRound.suggest(optuna.trial.FixedTrial(params), ctx) == expected and AdaRound.applies(ctx)
    bare = SearchContext(task=Task(task.name, task.model, task.example, task.metric, task.eval),
                         target=Target(max_drop=0.01), baseline={})
    assert not AdaRound.applies(bare)
