"""Shared factorization helpers: rank rounding to the CPU kernels' channel block, its validation."""

import pytest

from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.factorize import CP, SVD, Tucker
from slimkit.factorize.layers import round_rank


@pytest.mark.parametrize("rank, multiple, limit, expected", [
    (13, 8, 32, 16), (6, 8, 16, 8), (26, 8, 64, 24), (31, 8, 128, 32), (3, 8, 64, 8),  # nearest, at least one block
    (20, 8, 64, 24), (12, 8, 64, 16),  # halves round up
    (60, 8, 50, 50), (5, 8, 4, 4),  # never above the channels
    (13, 1, 32, 13), (40, 1, 32, 32),  # multiple 1: ranks as computed
])
def test_round_rank(rank, multiple, limit, expected):
    assert round_rank(rank, multiple, limit) == expected


@pytest.mark.parametrize("config", [Tucker, CP, SVD])
@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_bad_rank_multiple_is_a_one_line_error(config, bad):
    with pytest.raises(SlimkitError, match="rank_multiple"):
        config(rank_multiple=bad)


#: The benchmark's mnist configs (BENCHMARKS.md): ranks on multiples of 8, >= 3x fewer parameters,
#: accuracy before any recovery as measured (original 0.990 on the 1,000 test images).
MNIST_RANKS = [
    (Tucker(ratio=0.3, rank_multiple=8), {"4": [16, 8], "8": [24, 16], "13": 32}, 31722, 0.97),
    pytest.param(CP(ratio=0.3, rank_multiple=8), {"4": 24, "8": 56, "13": 32}, 31434, 0.97,
                 marks=pytest.mark.slow),  # 100 ALS sweeps: ~20 s on 2 busy cores
    (SVD(rank_ratio=0.3, targets="all", rank_multiple=8), {"4": 8, "8": 16, "13": 32}, 31466, 0.90),
]


@pytest.mark.parametrize("config, ranks, total, accuracy", MNIST_RANKS)
def test_mnist_ranks_on_multiples_of_8_stay_3x_smaller(mnist_task, config, ranks, total, accuracy):
    import slimkit as sk

    model = sk.apply(mnist_task.model, config, mnist_task)
    info = last_record(model)
    assert {n: v["rank"] for n, v in info.layers.items()} == ranks
    assert info.params == [98666, total] and 98666 / total >= 3.0
    assert "output layer" in info.skipped["15"]
    assert mnist_task.evaluate(model)["score"] >= accuracy
