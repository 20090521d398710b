import logging

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit import prune
from slimkit.core.record import last_record
from slimkit.train import fit


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 40), nn.ReLU(),
                         nn.Linear(40, 10))


def _zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def test_global_sparsity_is_exact_and_prunes_the_smallest_weights():
    model = _model()
    pruned = sk.apply(model, prune.Magnitude(amount=0.37))
    weights = {n: pruned.get_submodule(n).weight for n in ("0", "3", "5")}
    total = sum(w.numel() for w in weights.values())  # 216 + 11520 + 400
    assert sum(_zeros(w) for w in weights.values()) == round(0.37 * total)
    kept = torch.cat([w[w != 0].abs() for w in weights.values()])
    originals = {n: model.get_submodule(n).weight for n in weights}
    dropped = torch.cat([originals[n][weights[n] == 0].abs() for n in weights])
    assert dropped.max() <= kept.min()  # nothing kept is smaller than anything pruned
    assert _zeros(model[3].weight) == 0  # apply() left the caller's model alone
    assert last_record(pruned).sparsity == pytest.approx(round(0.37 * total) / total)


def test_layer_scope_prunes_every_layer_exactly():
    pruned = sk.apply(_model(), prune.Magnitude(amount=0.25, scope="layer"))
    for name, n in (("0", 216), ("3", 11520), ("5", 400)):
        assert _zeros(pruned.get_submodule(name).weight) == round(0.25 * n)
    assert last_record(pruned).layers == {"0": 54 / 216, "3": 0.25, "5": 0.25}


def test_masks_are_permanent_zeros_not_parametrizations():
    model = _model()
    pruned = sk.apply(model, prune.Magnitude(amount=0.5, targets="all-linear"))
    assert set(pruned.state_dict()) == set(model.state_dict())
    assert not any("parametrizations" in n for n, _ in pruned.named_modules())
    assert _zeros(pruned[0].weight) == 0  # conv not targeted
    assert type(pruned[3]) is nn.Linear


def test_invalid_amount_scope_and_config_round_trip():
    for bad in (1.0, -0.1, 1.5, True, "0.5"):
        with pytest.raises(sk.SlimkitError, match="not a fraction"):
            prune.Magnitude(amount=bad)
    with pytest.raises(sk.SlimkitError, match="scope='row'"):
        prune.Magnitude(scope="row")
    cfg = prune.Magnitude(amount=0.8, scope="layer", exclude=("5",))
    assert sk.BaseConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["type"] == "prune.Magnitude"


def test_unsupported_layers_are_skipped_with_a_logged_reason(caplog):
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    with caplog.at_level(logging.INFO, logger="slimkit.prune"):
        pruned = sk.apply(model, prune.Magnitude(amount=0.5, targets=("0", "1", "2")))
    assert _zeros(pruned[1].weight) == 32 and _zeros(pruned[0].weight) == 0
    assert set(last_record(pruned).skipped) == {"0", "2"}
    assert "not pruned: 0 (Embedding has no float Linear/Conv weight to prune)" in caplog.text
    with pytest.raises(sk.SlimkitError, match="no layer to prune"):
        sk.apply(model, prune.Magnitude(targets=("0",)))


def test_masked_keeps_pruned_weights_zero_during_training(one_thread):
    model = sk.apply(_model(), prune.Magnitude(amount=0.6))
    zeros = {n: model.get_submodule(n).weight == 0 for n in ("0", "3", "5")}
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,))
    with prune.masked(model):  # gradient hooks alone: a fresh AdamW never moves a zero weight
        fit(model, x, y, epochs=2, batch_size=16, weight_decay=0.1, progress=False)
    assert all(torch.equal(model.get_submodule(n).weight == 0, z) for n, z in zeros.items())
    # An optimizer with momentum from before pruning would revive weights; the after_step re-mask stops that.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    with prune.masked(model, {n: ~z for n, z in zeros.items()}) as after_step:
        for step in range(1, 4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            after_step(model, step)
            assert all(torch.equal(model.get_submodule(n).weight == 0, z) for n, z in zeros.items())


def test_digits_half_pruned_and_fine_tuned_stays_within_one_point(digits_task, one_thread):
    base = digits_task.evaluate()["score"]
    pruned = sk.apply(digits_task.model, prune.Magnitude(amount=0.5))
    x = torch.cat([b[0][0] for b in digits_task.train])
    y = torch.cat([b[1] for b in digits_task.train])
    with prune.masked(pruned):
        fit(pruned, x, y, epochs=2, lr=5e-4, progress=False)
    assert prune.global_sparsity(pruned) == pytest.approx(0.5, abs=1e-4)
    assert digits_task.evaluate(pruned)["score"] >= base - 0.01
