"""Mixed precision: the integer program is exact and beats greedy; the chosen model is real and reloads."""

import dataclasses

import pytest
import torch

import slimkit as sk
from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.quantize import QuantConv2d, QuantLinear
from slimkit.quantize.half import HalfConv2d, HalfLinear
from slimkit.quantize.mixed import Mixed, greedy, layer_bytes, solve
from tests.conftest import sqnr_db


def _planted():
    """Item 0 saves bytes at the best rate but not enough, so greedy also has to take item 1 down; the
    optimum takes only item 1 down, which alone fills the budget exactly, at a lower cost."""
    sizes = [[8, 20], [10, 30], [12, 20]]  # option 0: low precision, option 1: high
    costs = [[0.5, 0.0], [0.9, 0.0], [1.0, 0.0]]
    return costs, sizes, 50


def test_knapsack_meets_the_budget_exactly_and_beats_greedy():
    costs, sizes, budget = _planted()
    best, heuristic = solve(costs, sizes, budget), greedy(costs, sizes, budget)
    size = lambda choice: sum(sizes[i][j] for i, j in enumerate(choice))  # noqa: E731
    cost = lambda choice: sum(costs[i][j] for i, j in enumerate(choice))  # noqa: E731
    assert best == [1, 0, 1] and size(best) == budget
    assert size(heuristic) <= budget
    assert cost(best) == pytest.approx(0.9) and cost(heuristic) == pytest.approx(1.4)
    with pytest.raises(SlimkitError, match="below the smallest possible size"):
        solve(costs, sizes, 21)


def test_knapsack_is_optimal_on_random_instances():
    import itertools

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = [[int(v) for v in sorted(torch.randint(1, 30, (3,), generator=gen).tolist())] for _ in range(5)]
        costs = [[float(c) for c in sorted(torch.rand(3, generator=gen).tolist(), reverse=True)] for _ in range(5)]
        budget = sum(r[1] for r in sizes)
        best = solve(costs, sizes, budget)
        brute = min((sum(costs[i][j] for i, j in enumerate(ch)), ch) for ch in itertools.product(range(3), repeat=5)
                    if sum(sizes[i][j] for i, j in enumerate(ch)) <= budget)
        assert sum(costs[i][j] for i, j in enumerate(best)) == pytest.approx(brute[0])


def test_layer_bytes():
    lin, conv = torch.nn.Linear(64, 10), torch.nn.Conv2d(3, 8, 3)
    assert layer_bytes(lin, 4, 32) == 10 * 32 + 8 * 10 * 2
    assert layer_bytes(lin, 8, 32) == 640 + 40 and layer_bytes(lin, 16, 32) == 1280
    assert layer_bytes(conv, 4, 32) is None and layer_bytes(conv, 8, 32) == 8 * 27 + 32


def _uniform_ratio(model, bits_of) -> float:
    from slimkit.measure.sensitivity import weight_layers

    layers = [model.get_submodule(n) for n in weight_layers(model)]
    used = sum(layer_bytes(m, bits_of(m), 32) for m in layers)
    return used / sum(4 * m.weight.numel() for m in layers)


def test_mixed_mnist_fits_the_budget_reloads_and_beats_uniform_int4(mnist_task, one_thread, tmp_path):
    model = mnist_task.model
    r4 = _uniform_ratio(model, lambda m: 4 if isinstance(m, torch.nn.Linear) else 8)  # int4 where it fits
    r8 = _uniform_ratio(model, lambda m: 8)
    uniform = sk.apply(model, Mixed(candidates=(4, 8), budget_ratio=r4 + 1e-9), mnist_task)
    assert set(last_record(uniform).bits.values()) == {4, 8}
    mixed = sk.apply(model, Mixed(budget_ratio=(r4 + r8) / 2), mnist_task)
    info = last_record(mixed)
    assert info.weight_bytes <= info.budget_bytes < r8 * info.fp32_weight_bytes
    kinds = {QuantLinear, QuantConv2d, HalfLinear, HalfConv2d}
    assert all(type(mixed.get_submodule(n)) in kinds for n in info.bits)
    x = mnist_task.eval[0][0][0]
    with torch.no_grad():
        ref = model(x)
        assert sqnr_db(ref, mixed(x)) > sqnr_db(ref, uniform(x)) + 3  # a little more bytes, much less noise
    assert mnist_task.evaluate(mixed)["score"] >= 0.985
    sk.save(mixed, tmp_path / "m")
    back = sk.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(x), mixed(x))


def test_config_round_trip_and_errors():
    c = Mixed(budget_ratio=0.3, candidates=(4, 8), sensitivity={"fc": 0.1})
    assert BaseConfig.from_json(c.to_json()) == c
    with pytest.raises(SlimkitError, match="candidates"):
        Mixed(candidates=(2, 8))
    with pytest.raises(SlimkitError, match="budget_ratio"):
        Mixed(budget_ratio=0.0)


def test_optimizer_offers_qat_mixed_and_ternary(digits_task):
    import optuna

    from slimkit.core.registry import SearchContext
    from slimkit.core.registry import searchable as techniques
    from slimkit.quantize.extreme import Ternary
    from slimkit.quantize.qat import QAT

    found = {t.search: t for t in techniques(["qat", "mixed", "ternary"])}
    assert {t.stage for t in found.values()} == {"quantize"}
    from slimkit.measure.sensitivity import weight_layers

    names = weight_layers(digits_task.model)
    ctx = SearchContext(task=digits_task, target=None, baseline={}, sensitivity={n: 0.01 for n in names})
    assert not found["qat"].applies(ctx) and not found["ternary"].applies(ctx) and found["mixed"].applies(ctx)
    ctx.trainable = True
    assert found["qat"].applies(ctx)
    qat = found["qat"].suggest(optuna.trial.FixedTrial({"qat.bits": 4, "qat.steps": 100, "qat.learn_scale": True,
                                                        "qat.group_size": 64}), ctx)
    assert qat == QAT(bits=4, weight_only=True, group_size=64, steps=100)
    mixed = found["mixed"].suggest(optuna.trial.FixedTrial({"mixed.widths": "budget", "mixed.budget_ratio": 0.31,
                                                            "mixed.activations": "dynamic",
                                                            "mixed.int4_groups": "32+128"}), ctx)
    assert mixed.budget_ratio == 0.31 and mixed.sensitivity == ctx.sensitivity and mixed.activations == "dynamic"
    assert mixed.int4_groups == (128,)
    tern = found["ternary"].suggest(optuna.trial.FixedTrial({"ternary.steps": 300}), ctx)
    assert tern == Ternary(steps=300)
    assert BaseConfig.from_json(mixed.to_json()) == mixed
    ctx.sensitivity = {names[0]: 0.1}  # not every layer measured: the handler measures them itself
    plain = found["mixed"].suggest(optuna.trial.FixedTrial({"mixed.widths": "budget", "mixed.budget_ratio": 0.3,
                                                            "mixed.activations": "none", "mixed.int4_groups": "32"}), ctx)
    assert plain.sensitivity is None and plain.int4_groups == ()
    assert found["mixed"].suggest(optuna.trial.FixedTrial({"mixed.widths": "narrowest"}), ctx) == Mixed(narrowest=True)


def test_narrowest_is_the_smallest_artifact_without_measuring(mnist_task):
    from slimkit.io import artifact_bytes

    narrow = sk.apply(mnist_task.model, Mixed(narrowest=True), mnist_task)
    bits = last_record(narrow).bits
    assert bits == {"0": 8, "4": 8, "8": 8, "13": 4, "15": 4}      # convs 8-bit, Linear 4-bit per row
    budget = sk.apply(mnist_task.model, Mixed(budget_ratio=0.3), mnist_task)

    def size(m, d):
        sk.save(m, d)
        return artifact_bytes(d)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        assert size(narrow, Path(tmp) / "n") < size(budget, Path(tmp) / "b")
    assert last_record(narrow).weight_bytes < 0.16 * last_record(narrow).fp32_weight_bytes
    assert mnist_task.evaluate(narrow)["score"] >= mnist_task.evaluate()["score"] - 0.02


def test_int4_conv_bytes():
    conv = torch.nn.Conv2d(3, 8, 3)  # K = 27: 14 bytes of codes per channel + two float32
    assert layer_bytes(conv, 4, 32, int4_convs=True) == 8 * 14 + 8 * 8
    assert layer_bytes(conv, 4, 32) is None


def test_measured_costs_are_used_as_given(mnist_task, one_thread):
    from slimkit.quantize.mixed import measure_costs

    model = mnist_task.model
    base = Mixed(candidates=(4, 8), int4_convs=True, budget_ratio=0.23)
    measured = measure_costs(model, base, mnist_task)
    assert set(measured) == {"4", "8"} and set(measured["4"]) == {"0", "4", "8", "13", "15"}
    assert all(measured["4"][n] > measured["8"][n] > 0 for n in measured["4"])  # 4 bits is noisier everywhere
    again = sk.apply(model, dataclasses.replace(base, measured=measured), mnist_task)
    fresh = sk.apply(model, base, mnist_task)
    assert last_record(again).bits == last_record(fresh).bits and last_record(fresh).bits["13"] == 4
    planted = {"4": {**measured["4"], "13": 1e3}, "8": measured["8"]}  # the big Linear must not take 4 bits
    forced = sk.apply(model, dataclasses.replace(base, measured=planted), mnist_task)
    assert last_record(forced).bits["13"] == 8
    assert BaseConfig.from_json(dataclasses.replace(base, measured=measured).to_json()).measured == measured


def test_mixed_beats_uniform_int4_a_little_above_its_bytes_on_mnist(mnist_task, one_thread):
    """All five layers may take int4 (convolutions per channel): uniform int4 loses 0.6 pt; 1.1x its
    bytes lets the solver keep the sensitive first convolutions wider and the accuracy comes back."""
    from slimkit.quantize.extreme_modules import BitConv2d

    model = mnist_task.model
    from slimkit.measure.sensitivity import weight_layers

    layers = [model.get_submodule(n) for n in weight_layers(model)]
    fp32 = sum(4 * m.weight.numel() for m in layers)
    r4 = sum(layer_bytes(m, 4, 32, int4_convs=True) for m in layers) / fp32
    uniform = sk.apply(model, Mixed(candidates=(4,), int4_convs=True, budget_ratio=r4 + 1e-9), mnist_task)
    assert sum(isinstance(m, BitConv2d) for m in uniform.modules()) == 3
    mixed = sk.apply(model, Mixed(int4_convs=True, budget_ratio=1.1 * r4), mnist_task)
    assert last_record(mixed).weight_bytes <= 1.1 * r4 * fp32
    x = torch.cat([b[0][0] for b in mnist_task.eval])  # (1000, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        assert sqnr_db(ref, mixed(x)) > sqnr_db(ref, uniform(x)) + 10  # measured: 31.3 vs 17.4 dB
    acc_uniform, acc_mixed = mnist_task.evaluate(uniform)["score"], mnist_task.evaluate(mixed)["score"]
    assert acc_uniform <= 0.986 and acc_mixed >= acc_uniform + 0.004  # measured: 0.984 vs 0.990


def test_int8_activation_layers_beside_int4_weight_only_run_on_torch(mnist_task, one_thread):
    """``activations="dynamic"``: the 8-bit layers quantize their inputs too (int8 x int8 kernels), the
    4-bit ones stay weight-only; the model mixes modes, so the torch runtime runs it and ORT refuses."""
    from slimkit.runtime import build, ort_plan, quant_mode, resolve_backend

    model = mnist_task.model
    measured = {"4": {"0": 1.0, "4": 1.0, "8": 1.0, "13": 0.01, "15": 1.0},
                "8": {"0": 0.01, "4": 0.01, "8": 0.01, "13": 0.0001, "15": 0.01}}
    kw = dict(candidates=(4, 8), budget_ratio=0.25, measured=measured)
    both = sk.apply(model, Mixed(activations="dynamic", **kw), mnist_task)
    weights = sk.apply(model, Mixed(**kw), mnist_task)
    bits = last_record(both).bits
    assert bits == last_record(weights).bits and bits["13"] == 4 and bits["0"] == 8
    assert both.get_submodule("13").activations == "none" and both.get_submodule("0").activations == "dynamic"
    assert both.get_submodule("15").activations == "dynamic"
    assert quant_mode(both) == "mixed" and resolve_backend(both) == "torch" and quant_mode(weights) == "none"
    with pytest.raises(SlimkitError, match="mixes quantization modes"):
        ort_plan(both)
    x = torch.cat([b[0][0] for b in mnist_task.eval[:2]])  # (B, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        assert sqnr_db(ref, build(both)(x)) > 20 and sqnr_db(ref, weights(x)) > 20
    assert mnist_task.evaluate(build(both))["score"] >= mnist_task.evaluate(model)["score"] - 0.005
    with pytest.raises(SlimkitError, match="activations"):
        Mixed(activations="static")


def test_group_128_bytes_and_options():
    from slimkit.quantize.mixed import option_bytes, options

    lin = torch.nn.Linear(256, 64)
    assert layer_bytes(lin, 4, 128) == 64 * 128 + 8 * 64 * 2  # 4.5 bits a weight
    assert layer_bytes(lin, 4, 32) == 64 * 128 + 8 * 64 * 8  # 6 bits a weight
    assert layer_bytes(torch.nn.Linear(576, 8), 4, 128) is None  # 128 does not divide K
    config = Mixed(int4_groups=(128, 64))
    assert [k for k, _, _ in options(config)] == ["4", "4g64", "4g128", "8", "16"]
    assert option_bytes(torch.nn.Conv2d(3, 8, 3), ("4g128", 4, 128), Mixed(int4_convs=True)) is None  # Linear only
    assert BaseConfig.from_json(config.to_json()) == config
    for bad in (dict(int4_groups=(96,)), dict(int4_groups=(32,)), dict(int4_groups=(128, 128)),
                dict(candidates=(8, 16), int4_groups=(128,)), dict(narrowest=True, int4_groups=(128,))):
        with pytest.raises(SlimkitError, match="int4_groups"):
            Mixed(**bad)


def test_coarser_int4_groups_buy_int8_layers_at_exactly_the_uniform_int4_bytes(digits_task, one_thread, tmp_path):
    """Every layer int4 at group 32 (convolutions per channel) vs the same bytes spent per layer: the big
    Linear drops to group 128 (6 -> 4.5 bits a weight) and the freed bytes keep a convolution 8-bit."""
    from slimkit.measure.sensitivity import weight_layers
    from slimkit.quantize.mixed import measure_costs

    model = digits_task.model
    layers = {n: model.get_submodule(n) for n in weight_layers(model)}
    fp32 = sum(4 * m.weight.numel() for m in layers.values())
    r4 = sum(layer_bytes(m, 4, 32, int4_convs=True) for m in layers.values()) / fp32 + 1e-9
    uniform = sk.apply(model, Mixed(candidates=(4,), int4_convs=True, budget_ratio=r4), digits_task)
    assert set(last_record(uniform).bits.values()) == {4}
    config = Mixed(int4_convs=True, budget_ratio=r4, int4_groups=(128,))
    measured = measure_costs(model, config, digits_task)
    assert set(measured) == {"4", "4g128", "8"} and set(measured["4g128"]) == {"12"}  # 128 divides only K=256
    assert measured["4g128"]["12"] > measured["4"]["12"] > measured["8"]["12"]
    mixed = sk.apply(model, dataclasses.replace(config, measured=measured), digits_task)
    info = last_record(mixed)
    assert info.weight_bytes <= info.budget_bytes == pytest.approx(last_record(uniform).weight_bytes)
    assert info.group_sizes["12"] == 128 and mixed.get_submodule("12").group_size == 128
    assert any(info.bits[n] >= 8 for n in ("3", "7", "12", "14"))  # freed bytes bought a wider layer
    x = torch.cat([b[0][0] for b in digits_task.eval])  # (N, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert sqnr_db(ref, mixed(x)) > sqnr_db(ref, uniform(x)) + 6  # measured: 29.4 vs 17.8 dB
    assert digits_task.evaluate(mixed)["score"] >= digits_task.evaluate(uniform)["score"]
    sk.save(mixed, tmp_path / "m")
    back = sk.load(tmp_path / "m")
    assert back.get_submodule("12").group_size == 128
    with torch.no_grad():
        assert torch.equal(back(x), mixed(x))


def test_without_int4_groups_the_choice_is_unchanged(digits_task, one_thread):
    """No extra groups: every int4 Linear keeps ``group_size`` and costs given in the older shape
    (integer keys, no ``4g`` entries) give the same choice as measuring."""
    from slimkit.quantize.mixed import measure_costs

    config = Mixed(budget_ratio=0.235)
    assert config.int4_groups == ()
    measured = measure_costs(digits_task.model, config, digits_task)
    assert set(measured) == {"4", "8"}
    fresh = sk.apply(digits_task.model, config, digits_task)
    old = sk.apply(digits_task.model, dataclasses.replace(config, measured={int(k): v for k, v in measured.items()}),
                   digits_task)
    assert last_record(fresh).bits == last_record(old).bits
    assert 4 in last_record(fresh).bits.values()
    assert set(last_record(fresh).group_sizes.values()) == {32}
    assert set(last_record(fresh).sensitivity) == {"4", "8", "16"}
    from slimkit.measure.sensitivity import layer_sensitivity

    g64 = measure_costs(digits_task.model, dataclasses.replace(config, group_size=64), digits_task)  # "4": its group
    at64 = layer_sensitivity(digits_task.model, digits_task, bits=4, layers=["12"], measure="output", group_size=64)
    assert g64["4"]["12"] == at64["12"] != measured["4"]["12"]
