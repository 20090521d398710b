"""Truncated SVD: exact error identity, rank rules, parameter counts, skips with reasons, configs."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.factorize import SVD, LowRankConv2d, LowRankLinear, low_rank, rank_for_energy, rank_for_ratio
from slimkit.factorize.svd import truncated_svd


def test_reconstruction_error_is_the_discarded_energy():
    torch.manual_seed(0)
    w = torch.randn(48, 80, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for rank in (1, 5, 20, 47):
        left, right = truncated_svd(w, rank)
        assert left.shape == (48, rank) and right.shape == (rank, 80)
        error = float(((w - left @ right) ** 2).sum())
        assert error == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-9)


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert rank_for_energy(s, 16 / 22) == 1
    assert rank_for_energy(s, 0.8) == 2
    assert rank_for_energy(s, 21 / 22) == 3
    assert rank_for_energy(s, 1.0) == 4
    assert rank_for_ratio(128, 576, 0.3) == int(0.3 * 128 * 576 / (128 + 576))  # 31
    assert rank_for_ratio(10, 10, 0.01) == 1


@pytest.mark.parametrize("make", [lambda: nn.Linear(40, 24),
                                  lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1),
                                  lambda: nn.Conv2d(8, 12, 1)])
def test_full_rank_outputs_match(make):
    torch.manual_seed(1)
    layer = make()
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    new = low_rank(layer, full)
    assert isinstance(new, LowRankLinear if isinstance(layer, nn.Linear) else LowRankConv2d)
    x = torch.randn(3, 40) if isinstance(layer, nn.Linear) else torch.randn(3, layer.in_channels, 9, 9)
    with torch.no_grad():
        assert torch.allclose(new(x), layer(x), atol=1e-5)


def test_param_counts_follow_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))
    out = sk.apply(model, SVD(rank_ratio=0.25))
    info = last_record(out)
    for name, (m, n) in {"0": (256, 64), "2": (32, 256)}.items():
        r = int(0.25 * m * n / (m + n))
        assert info.layers[name]["rank"] == r
        assert info.layers[name]["params_after"] == r * (m + n) + m
        assert sum(p.numel() for p in out.get_submodule(name).parameters()) == r * (m + n) + m
    # 32 -> 10 at a quarter: rank 1 stores 42 + 10 params < 330, so it is factorized too
    assert info.layers["4"]["rank"] == 1
    assert info.params == [sum(p.numel() for p in model.parameters()), sum(p.numel() for p in out.parameters())]


def test_layers_that_would_not_shrink_are_skipped_with_the_reason(caplog):
    model = nn.Sequential(nn.Linear(4, 300), nn.Linear(300, 4))
    with caplog.at_level("INFO", logger="slimkit.factorize"):
        out = sk.apply(model, SVD(energy=1.0))  # energy 1.0 needs the full rank 4 > 4*300/304
    assert last_record(out).layers == {}
    assert set(last_record(out).skipped) == {"0", "1"}
    assert "mn/(m+n)" in last_record(out).skipped["0"]
    assert "left as it is" in caplog.text
    assert isinstance(out[0], nn.Linear)


def test_sensitivity_allocation_respects_the_budget_and_protects_the_sensitive_layer(digits_task):
    model = sk.apply(digits_task.model, SVD(rank_ratio=0.3, allocation="sensitivity", targets="all"), digits_task)
    info = last_record(model)
    chosen = [n for n, m in digits_task.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    original = sum(sum(p.numel() for p in digits_task.model.get_submodule(n).parameters()) for n in chosen)
    after = sum(sum(p.numel() for p in model.get_submodule(n).parameters()) for n in chosen)
    assert after <= 0.3 * original
    uniform = sk.apply(digits_task.model, SVD(rank_ratio=0.3, targets="all"), digits_task)
    base = digits_task.evaluate()["score"]
    assert digits_task.evaluate(model)["score"] >= digits_task.evaluate(uniform)["score"] - 0.01
    assert digits_task.evaluate(model)["score"] > base - 0.3
    assert len(info.layers) >= 2


@pytest.mark.parametrize("kwargs, fragment", [
    ({"rank_ratio": 0.0}, "rank_ratio=0.0 is out of range"),
    ({"rank_ratio": 1.5}, "rank_ratio=1.5 is out of range"),
    ({"energy": 0.0}, "energy=0.0"),
    ({"allocation": "magic"}, "allocation='magic'"),
])
def test_invalid_configs_are_one_line_errors(kwargs, fragment):
    with pytest.raises(sk.SlimkitError) as e:
        SVD(**kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_unknown_layer_is_a_one_line_error():
    with pytest.raises(sk.SlimkitError) as e:
        sk.apply(nn.Sequential(nn.Linear(4, 4)), SVD(targets=("nope",)))
    assert "nope" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(sk.SlimkitError, match="matched no Linear"):
        sk.apply(nn.Sequential(nn.Linear(4, 4)), SVD(targets="head.*"))


def test_config_round_trips_json():
    c = SVD(rank_ratio=0.4, targets=("a", "b"), exclude="c.*")
    assert sk.BaseConfig.from_json(c.to_json()) == c
