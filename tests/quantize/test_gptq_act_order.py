"""GPTQ act-order with static groups: columns visited by decreasing input energy, groups kept contiguous."""

from __future__ import annotations

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.formats import pack
from slimkit.quantize.gptq import gptq_int4


def _inputs(seed: int) -> torch.Tensor:
    """(2048, 256) inputs whose channels differ in size by orders of magnitude and correlate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    return x @ (torch.eye(256) + 0.02 * torch.randn(256, 256, generator=g))


def _sqnr_db(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    y = x @ w.T  # (rows, N)
    return float(10 * torch.log10(y.pow(2).sum() / (x @ (w - wq).T).pow(2).sum()))


@pytest.mark.parametrize("group_size, seed, min_gain_db", [(32, 0, 1.0), (128, 1, 1.5)])
def test_act_order_beats_natural_order_on_outlier_channels(group_size: int, seed: int, min_gain_db: float) -> None:
    x = _inputs(seed)
    h = x.T @ x / x.shape[0]  # (256, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed + 10))
    natural = _sqnr_db(x, w, pack.dequantize_int4(*gptq_int4(w, h, group_size, act_order=False)))
    ordered = _sqnr_db(x, w, pack.dequantize_int4(*gptq_int4(w, h, group_size, act_order=True)))
    rtn = _sqnr_db(x, w, pack.dequantize_int4(*pack.quantize_weight_int4(w, group_size)))
    assert ordered >= natural + min_gain_db > rtn + min_gain_db


def test_act_order_keeps_the_int4_format_and_static_group_ranges() -> None:
    """Codes in [0, 15], one scale / zero per contiguous group, each group's range that of its weights."""
    x = _inputs(2)
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    packed, scale, zero = gptq_int4(w, x.T @ x / x.shape[0], 64, act_order=True)
    assert packed.shape == (16, 128) and scale.shape == zero.shape == (16, 4)
    q = pack.unpack_int4(packed)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    grp = w.reshape(16, 4, 64)
    assert torch.allclose(scale * 15, grp.amax(-1) - grp.amin(-1), rtol=1e-5)
    assert torch.allclose(-zero * scale, grp.amin(-1), atol=1e-5)


def test_act_order_names_a_hessian_that_does_not_fit() -> None:
    with pytest.raises(SlimkitError, match="does not fit"):
        gptq_int4(torch.randn(8, 64), torch.eye(32), 32, act_order=True)
