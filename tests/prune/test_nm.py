import logging

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit import prune


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
                         nn.Linear(32, 10))


def test_two_of_four_keeps_exactly_the_two_largest_of_every_group():
    w = torch.randn(64, 128)
    mask = prune.nm_mask(w, 2, 4)
    groups = mask.view(64, 32, 4)
    assert bool((groups.sum(-1) == 2).all())
    a = w.abs().view(64, 32, 4)
    kept_min = a.masked_fill(~groups, float("inf")).min(-1).values
    dropped_max = a.masked_fill(groups, -1.0).max(-1).values
    assert bool((kept_min >= dropped_max).all())
    assert prune.is_nm(w * mask, 2, 4) and not prune.is_nm(w, 2, 4)
    assert prune.is_nm(torch.zeros(4, 8))  # fewer non-zeros than n is still a valid pattern


def test_nm_config_prunes_linear_and_conv_and_skips_misfits_with_a_reason(caplog):
    with caplog.at_level(logging.INFO, logger="slimkit.prune"):
        pruned = sk.apply(_model(), prune.NM())
    assert "not pruned: 0 (27 inputs per output is not a multiple of 4)" in caplog.text
    assert pruned.slimkit_prune["skipped"] == {"0": "27 inputs per output is not a multiple of 4"}
    assert int((pruned[0].weight == 0).sum()) == 0
    for name in ("1", "3", "4"):
        w = pruned.get_submodule(name).weight  # conv (16, 8, 3, 3) is checked as (16, 72)
        assert prune.is_nm(w, 2, 4)
        assert int((w == 0).sum()) == w.numel() // 2
    assert pruned.slimkit_prune["layers"] == {"1": 0.5, "3": 0.5, "4": 0.5}
    four_eight = sk.apply(_model(), prune.NM(n=4, m=8, targets="all-linear"))
    assert prune.is_nm(four_eight[3].weight, 4, 8) and not prune.is_nm(four_eight[3].weight, 2, 4)


def test_invalid_patterns_are_refused():
    for n, m in ((2, 2), (0, 4), (3, 2), (2.0, 4), (True, 4)):
        with pytest.raises(sk.SlimkitError, match="is not an N:M pattern"):
            prune.NM(n=n, m=m)
    with pytest.raises(sk.SlimkitError, match="not a multiple of 4"):
        prune.nm_mask(torch.randn(4, 6))
    with pytest.raises(sk.SlimkitError, match="no targeted layer"):
        sk.apply(_model(), prune.NM(targets=("0",)))
    assert sk.BaseConfig.from_dict(prune.NM(n=1, m=4).to_dict()) == prune.NM(n=1, m=4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_semi_structured_conversion_needs_cuda():
    with pytest.raises(sk.SlimkitError, match="needs a CUDA GPU"):
        prune.to_semi_structured(sk.apply(_model(), prune.NM()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_semi_structured_conversion_on_cuda_matches_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
    model = sk.apply(model, prune.NM()).half().cuda()
    x = torch.randn(64, 128, dtype=torch.half, device="cuda")
    ref = model(x)
    assert prune.to_semi_structured(model) == ["0", "2"]
    assert (model(x) - ref).abs().max().item() < 1e-2
