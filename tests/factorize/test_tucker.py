"""Tucker-2: error falls with rank, exact recovery at the true rank, conv equivalence, counts, configs."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.factorize import Tucker, TuckerConv2d, tucker2, tucker2_reconstruct, tucker_conv
from slimkit.factorize.tucker import ranks_for_ratio, tucker_params


def low_rank_kernel(o=24, i=16, r_out=5, r_in=4, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, k, k, generator=gen, dtype=torch.float64)
    return tucker2_reconstruct(core, torch.randn(o, r_out, generator=gen, dtype=torch.float64),
                               torch.randn(i, r_in, generator=gen, dtype=torch.float64))


def rel_error(w, approx):
    return float((w - approx).norm() / w.norm())


def test_exact_recovery_at_the_true_multilinear_rank():
    w = low_rank_kernel()
    assert rel_error(w, tucker2_reconstruct(*tucker2(w, 5, 4))) < 1e-12


def test_error_falls_as_rank_rises_and_hooi_does_not_hurt():
    torch.manual_seed(0)
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64) + low_rank_kernel(32, 24, 6, 6, seed=1)
    errors = [rel_error(w, tucker2_reconstruct(*tucker2(w, r, r))) for r in (2, 4, 8, 16, 24)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 3
    for r in (2, 4, 8):
        hosvd = rel_error(w, tucker2_reconstruct(*tucker2(w, r, r)))
        hooi = rel_error(w, tucker2_reconstruct(*tucker2(w, r, r, hooi_iters=10)))
        assert hooi <= hosvd + 1e-12


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), 1)])
def test_full_rank_tucker_conv_matches_the_conv(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation).double()
    new = tucker_conv(conv, 10, 6)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(new(x), conv(x), atol=1e-10)


def test_param_counts_follow_the_formula(mnist_task):
    model = sk.apply(mnist_task.model, Tucker(ratio=0.3))
    info = last_record(model)
    conv = mnist_task.model[8]  # 32 -> 64, 3x3
    r_out, r_in = info.layers["8"]["rank"]
    assert (r_out, r_in) == ranks_for_ratio(conv, 0.3)
    expected = 32 * r_in + r_in * r_out * 9 + r_out * 64 + 64
    assert tucker_params(conv, r_out, r_in) == expected == info.layers["8"]["params_after"]
    assert expected <= 0.3 * (32 * 64 * 9 + 64)
    assert isinstance(model[8], TuckerConv2d)
    assert "input channel" in info.skipped["0"]  # an image-input conv stays whole
    assert info.layers["13"]["method"] == "svd"  # Tucker-2 of a matrix is its SVD
    assert info.params[1] == sum(p.numel() for p in model.parameters())


def test_fixed_ranks_and_invalid_configs():
    conv = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1))
    out = sk.apply(conv, Tucker(ranks=(4, 3), hooi_iters=0))
    assert last_record(out).layers["0"]["rank"] == [4, 3]
    for kwargs, fragment in (({"ratio": 0}, "ratio=0"), ({"ratio": 1.01}, "ratio=1.01"),
                             ({"ranks": (0, 2)}, "ranks=(0, 2)"), ({"hooi_iters": -1}, "hooi_iters=-1")):
        with pytest.raises(sk.SlimkitError) as e:
            Tucker(**kwargs)
        assert fragment in str(e.value) and "\n" not in str(e.value)
    assert sk.BaseConfig.from_json(Tucker(ratio=0.2, ranks=(4, 3)).to_json()) == Tucker(ratio=0.2, ranks=(4, 3))
