"""GPTQ int4: lower output error than round-to-nearest on correlated inputs, slimkit's int4 format,
clear errors, and the real MiniLM kept at cosine >= 0.98 to fp32 at int4 g32."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.calibrate.obs import input_hessians
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.formats import pack
from slimkit.quantize import WeightOnly
from slimkit.quantize.gptq import gptq_int4


def correlated_inputs(rows: int = 4096, k: int = 128, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """(rows, K) activations that live mostly in a rank-16 subspace, as real layer inputs do."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, k, generator=g)
    return torch.randn(rows, rank, generator=g) @ basis + 0.05 * torch.randn(rows, k, generator=g)


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float(((x @ w.T - x @ wq.T) ** 2).mean())


def test_gptq_halves_the_output_error_of_round_to_nearest_on_correlated_inputs():
    x = correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))  # (N, K)
    h = x.T @ x / x.shape[0]
    packed, scale, zero = gptq_int4(w, h, group_size=32)
    assert packed.shape == (64, 64) and packed.dtype == torch.uint8 and scale.shape == zero.shape == (64, 4)
    gptq_err = output_error(x, w, pack.dequantize_int4(packed, scale, zero))
    rtn_err = output_error(x, w, pack.dequantize_int4(*pack.quantize_weight_int4(w, 32)))
    assert gptq_err < 0.5 * rtn_err
    # Every integer is a real int4 level and every group's range covers its levels.
    q = pack.unpack_int4(packed)
    assert int(q.max()) <= 15 and bool((scale > 0).all())


def test_identity_hessian_gives_round_to_nearest():
    """With uncorrelated unit inputs there is nothing to compensate: GPTQ's rounding is RTN's."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    ours = pack.dequantize_int4(*gptq_int4(w, torch.eye(64), group_size=32, damp=0.0))
    rtn = pack.dequantize_int4(*pack.quantize_weight_int4(w, 32))
    assert torch.allclose(ours, rtn, atol=1e-5)


def test_inputs_that_are_always_zero_do_not_break_the_factorisation():
    x = correlated_inputs(k=64)
    x[:, 5] = 0.0
    w = torch.randn(8, 64)
    packed, scale, zero = gptq_int4(w, x.T @ x / x.shape[0], group_size=32)
    wq = pack.dequantize_int4(packed, scale, zero)
    assert torch.isfinite(wq).all()
    assert output_error(x, w, wq) < output_error(x, w, pack.dequantize_int4(*pack.quantize_weight_int4(w, 32)))


def test_bad_inputs_give_one_line_errors():
    w = torch.randn(8, 64)
    with pytest.raises(SlimkitError, match="does not fit"):
        gptq_int4(w, torch.eye(32), group_size=32)
    bad = torch.eye(64)
    bad[3, 3] = float("nan")
    with pytest.raises(SlimkitError, match="NaN"):
        gptq_int4(w, bad, group_size=32)
    with pytest.raises(SlimkitError, match="4-bit"):
        WeightOnly(bits=8, method="gptq")
    with pytest.raises(SlimkitError, match="method"):
        WeightOnly(bits=4, group_size=32, method="hqq")


def test_config_round_trips_with_its_method():
    cfg = WeightOnly(bits=4, group_size=32, method="gptq")
    assert sk.BaseConfig.from_json(cfg.to_json()) == cfg


def test_input_hessians_equal_the_gram_matrix_of_each_layers_inputs():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    batches = [(torch.randn(5, 6),), (torch.randn(7, 6),)]
    hs = input_hessians(model, ["0", "2"], batches)
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(hs["0"], x.T @ x / 12, atol=1e-5)
    hidden = torch.relu(model[0](x)).detach()
    assert torch.allclose(hs["2"], hidden.T @ hidden / 12, atol=1e-5)


def test_gptq_needs_calibration_data():
    model = nn.Sequential(nn.Linear(64, 8))
    with pytest.raises(SlimkitError, match="calibration"):
        sk.apply(model, WeightOnly(bits=4, group_size=32, method="gptq"))


@pytest.mark.slow
def test_gptq_keeps_minilm_close_to_fp32_where_round_to_nearest_does_not(minilm_task):
    rtn = sk.apply(copy.deepcopy(minilm_task.model), WeightOnly(bits=4, group_size=32, embeddings=False), minilm_task)
    gptq = sk.apply(copy.deepcopy(minilm_task.model), WeightOnly(bits=4, group_size=32, embeddings=False,
                                                                 method="gptq"), minilm_task)
    rtn_cos = minilm_task.evaluate(rtn)["cosine_to_fp32"]
    gptq_cos = minilm_task.evaluate(gptq)["cosine_to_fp32"]
    assert gptq_cos >= 0.98 > rtn_cos
    assert last_record(gptq).config["method"] == "gptq"
