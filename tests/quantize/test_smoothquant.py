"""SmoothQuant: the float function is kept exactly, static int8 gets closer to fp32, skips are listed."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.core.task import Task
from slimkit.pipeline.recipe import Recipe
from slimkit.quantize import Int8, SmoothQuant, SmoothQuantRecord
from tests.conftest import sqnr_db

OUTLIERS = 3  # input channels planted at x100


class NormLinear(nn.Module):
    """LayerNorm -> Linear, three LayerNorm channels scaled x100 (the outliers SmoothQuant moves)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 16)
        with torch.no_grad():
            self.norm.weight[:OUTLIERS] = 100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 32) -> (B, T, 16)
        return self.fc(self.norm(x))


class NormQKV(nn.Module):
    """One LayerNorm feeding three Linears (q, k, v) and a Linear -> Linear pair: two smoothable groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.down = nn.Linear(32, 32)
        with torch.no_grad():
            self.norm.weight[:OUTLIERS] = 100.0
            self.v.weight[:OUTLIERS] *= 100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 32) -> (B, T, 32)
        h = self.norm(x)
        return self.down(self.v(h)) + self.q(h) * self.k(h).sigmoid()


class ResidualNorm(nn.Module):
    """Post-norm residual: the LayerNorm output is also added back, so nothing may be folded into it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 32)
        self.act = nn.GELU()
        self.out = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 32)
        h = self.norm(x)
        return self.out(self.act(self.fc(h))) + h


def _task(model: nn.Module, calib: bool = True) -> Task:
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, 32, generator=gen),) for _ in range(4)]
    return Task("t", model, batches[0], metric=lambda r: 0.0, eval=None, calib=batches if calib else ())


def _x() -> torch.Tensor:
    return torch.randn(8, 6, 32, generator=torch.Generator().manual_seed(2))


STATIC = Int8(activations="static", backend="torch")


# (model, alpha, {producer: smoothed layers}, least SQNR gain in dB of static int8 with SmoothQuant)
CASES = {
    "norm-linear-0.5": (NormLinear, 0.5, {"norm": ["fc"]}, 6.0),
    "norm-linear-auto": (NormLinear, "auto", {"norm": ["fc"]}, 6.0),
    "norm-qkv-0.5": (NormQKV, 0.5, {"norm": ["q", "k", "v"], "v": ["down"]}, 6.0),
}


@pytest.mark.parametrize("case", CASES)
def test_float_function_kept_and_static_int8_closer(case):
    build, alpha, groups, gain = CASES[case]
    model, task, x = build(), None, _x()
    task = _task(model)
    smoothed = sk.apply(model, SmoothQuant(alpha=alpha), task)
    record = last_record(smoothed, SmoothQuantRecord)
    assert {p: g["layers"] for p, g in record.smoothed.items()} == groups
    assert record.skipped == {}
    with torch.inference_mode():
        assert (smoothed(x) - model(x)).abs().max() <= 1e-5 * (1 + model(x).abs().max())
        plain = sqnr_db(model(x), sk.apply(model, STATIC, task)(x))
        smooth = sqnr_db(model(x), sk.apply(model, [SmoothQuant(alpha=alpha), STATIC], task)(x))
    assert smooth - plain >= gain


def test_auto_picks_alpha_from_grid():
    model = NormLinear()
    record = last_record(sk.apply(model, SmoothQuant(alpha="auto"), _task(model)), SmoothQuantRecord)
    assert record.smoothed["norm"]["alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def test_residual_and_activation_are_listed_skips_and_model_unchanged():
    model = ResidualNorm()
    smoothed = sk.apply(model, SmoothQuant(), _task(model))
    record = last_record(smoothed, SmoothQuantRecord)
    assert record.smoothed == {}
    assert record.skipped == {
        "fc": "its input (norm) is also used elsewhere (e.g. a residual add): folding changes the output",
        "out": "preceded by GELU, which cannot absorb a scale"}
    for a, b in zip(model.state_dict().values(), smoothed.state_dict().values()):
        assert torch.equal(a, b)


def _bert() -> tuple[nn.Module, Task]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # value outliers, balanced in the output projection: the same float function
        for layer in model.encoder.layer:
            layer.attention.self.value.weight[:OUTLIERS] *= 30.0
            layer.attention.self.value.bias[:OUTLIERS] *= 30.0
            layer.attention.output.dense.weight[:, :OUTLIERS] /= 30.0
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randint(0, 100, (4, 12), generator=gen),) for _ in range(3)]
    return model, Task("bert", model, calib[0], metric=lambda r: 0.0, eval=None, calib=calib)


def test_tiny_bert_value_to_output_smoothed_and_static_int8_closer():
    model, task = _bert()
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(3))
    smoothed = sk.apply(model, SmoothQuant(alpha=0.5), task)
    record = last_record(smoothed, SmoothQuantRecord)
    assert {p: g["layers"] for p, g in record.smoothed.items()} == {
        f"encoder.layer.{i}.attention.self.value": [f"encoder.layer.{i}.attention.output.dense"] for i in (0, 1)}
    # post-norm BERT: every LayerNorm output is also the residual stream, so q/k/v and intermediate stay
    assert sum("is also used elsewhere" in why for why in record.skipped.values()) == 8
    assert sum("GELUActivation" in why for why in record.skipped.values()) == 2
    with torch.inference_mode():
        ref = model(ids).last_hidden_state.flatten()
        assert (smoothed(ids).last_hidden_state.flatten() - ref).abs().max() <= 1e-4
    cos, sqnr = {}, {}
    for name, steps in {"plain": [STATIC], "smooth": [SmoothQuant(alpha=0.5), STATIC]}.items():
        q = sk.apply(model, steps, task)
        with torch.inference_mode():
            cos[name] = float(torch.nn.functional.cosine_similarity(ref, q(ids).last_hidden_state.flatten(), dim=0))
        sqnr[name] = [sqnr_db(_output_of(model, f"encoder.layer.{i}.attention.output.dense", ids),
                              _output_of(q, f"encoder.layer.{i}.attention.output.dense", ids)) for i in (0, 1)]
    # measured: output projections 17.7 / 24.3 dB plain, 38.2 / 39.5 dB smoothed; cosine 0.999984 / 0.999985
    assert all(s - p >= 6.0 for s, p in zip(sqnr["smooth"], sqnr["plain"]))
    assert cos["smooth"] >= max(cos["plain"], 0.9999)


def _output_of(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """What the layer ``name`` returns when the whole model runs on ``ids``."""
    got = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, args, out: got.append(out))
    with torch.inference_mode():
        model(ids)
    handle.remove()
    return got[0]


def test_save_load_identical(tmp_path):
    model = NormLinear()
    task = _task(model)
    q = sk.apply(model, [SmoothQuant(alpha=0.5), STATIC], task)
    loaded = sk.load(sk.save(q, tmp_path / "sq"), model=NormLinear())
    with torch.inference_mode():
        assert torch.equal(loaded(_x()), q(_x()))


def test_recipe_replay_equals_apply():
    model = NormLinear()
    task = _task(model)
    steps = [SmoothQuant(alpha="auto"), STATIC]
    replayed = Recipe.from_steps([s.to_dict() for s in steps], task="t").replay(task)
    with torch.inference_mode():
        assert torch.equal(replayed(_x()), sk.apply(model, steps, task)(_x()))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: sk.apply(NormLinear(), SmoothQuant(), _task(NormLinear(), calib=False)),
     "SmoothQuant needs calibration data and the task has none"),
    (lambda: SmoothQuant(alpha=1.5), "SmoothQuant alpha=1.5 is not valid"),
    (lambda: SmoothQuant(alpha="best"), "SmoothQuant alpha='best' is not valid"),
    (lambda: sk.apply(nn.Sequential(nn.Conv2d(3, 3, 1)), SmoothQuant(), _task(NormLinear())),
     "SmoothQuant found no Linear layer to smooth"),
])
def test_bad_input_is_one_line_error(make, message):
    with pytest.raises(SlimkitError) as err:
        make()
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_config_round_trip_and_stage():
    from slimkit.core.registry import technique_of
    config = SmoothQuant(alpha="auto", exclude=("fc",))
    assert SmoothQuant.from_dict(config.to_dict()) == config
    assert technique_of(SmoothQuant).stage == "fuse"
