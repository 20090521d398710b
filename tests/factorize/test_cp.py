"""CP-ALS: exact recovery of a random low-rank tensor, error falls with rank, conv equivalence, counts."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.factorize import CP, CPConv2d, cp_als, cp_conv, cp_reconstruct
from slimkit.factorize.cp import cp_params


def random_cp(shape, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return cp_reconstruct([torch.randn(n, rank, generator=gen, dtype=torch.float64) for n in shape])


def rel_error(w, approx):
    return float((w - approx).norm() / w.norm())


def test_exact_recovery_at_the_true_rank():
    w = random_cp((12, 10, 3, 3), 4)
    assert rel_error(w, cp_reconstruct(cp_als(w, 4, iters=500))) < 1e-6


def test_error_falls_as_rank_rises():
    torch.manual_seed(0)
    w = torch.randn(16, 12, 3, 3, dtype=torch.float64)
    errors = [rel_error(w, cp_reconstruct(cp_als(w, r, iters=100))) for r in (1, 4, 16, 48)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.6 * errors[0]


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), 1)])
def test_cp_conv_computes_the_reconstructed_kernel(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=padding, dilation=dilation).double()
    with torch.no_grad():
        conv.weight.copy_(random_cp((10, 6, 3, 3), 5))  # exactly rank 5: the CP conv must equal the conv
    new = cp_conv(conv, 5, iters=500)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        assert float((new(x) - conv(x)).abs().max()) < 1e-5 * float(conv(x).abs().max())


def test_param_counts_and_skips(mnist_task):
    model = sk.apply(mnist_task.model, CP(ratio=0.3))
    info = last_record(model)
    conv = mnist_task.model[4]  # 16 -> 32, 3x3
    rank = info.layers["4"]["rank"]
    assert rank == int(0.3 * 16 * 32 * 9 / (16 + 32 + 3 + 3))
    assert info.layers["4"]["params_after"] == cp_params(conv, rank) == rank * (16 + 32 + 6) + 32
    assert isinstance(model[4], CPConv2d)
    assert "input channel" in info.skipped["0"]
    assert CP(rank=7).rank == 7
    for kwargs in ({"ratio": -0.1}, {"ratio": 2.0}, {"rank": 0}, {"iters": 0}):
        with pytest.raises(sk.SlimkitError) as e:
            CP(**kwargs)
        assert "\n" not in str(e.value)
