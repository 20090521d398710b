"""Energy estimate: equals the hand computation from Horowitz's table (ISSCC 2014, 45 nm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.measure import estimate_energy
from slimkit.measure.energy import BASIS, MAC_PJ, OP_PJ, precision_of


def test_table_is_horowitz_45nm():
    assert OP_PJ == {"fp32_add": 0.9, "fp32_mult": 3.7, "fp16_add": 0.4, "fp16_mult": 1.1,
                     "int32_add": 0.1, "int32_mult": 3.1, "int8_add": 0.03, "int8_mult": 0.2}
    assert MAC_PJ["fp32"] == pytest.approx(4.6) and MAC_PJ["int8"] == pytest.approx(0.3)
    assert "estimate" in BASIS and "Horowitz" in BASIS and "ISSCC 2014" in BASIS


def test_single_linear_equals_hand_computation():
    batch, fin, fout = 8, 64, 32
    energy = estimate_energy(nn.Linear(fin, fout), torch.randn(batch, fin))
    macs = batch * fin * fout
    weight_bytes = (fin * fout + fout) * 4
    activation_bytes = (batch * fin + batch * fout) * 4  # input read + output written
    hand_pj = macs * (3.7 + 0.9) + weight_bytes / 4 * 640 + activation_bytes / 4 * 5
    assert energy.macs_by_precision == {"fp32": macs}
    assert energy.weight_bytes == weight_bytes and energy.activation_bytes == activation_bytes
    assert energy.total_mj == pytest.approx(hand_pj * 1e-9, rel=1e-12)
    assert energy.total_mj == pytest.approx(energy.compute_mj + energy.weights_mj + energy.activations_mj)


def test_half_precision_prices_fp16_macs_and_half_the_bytes():
    batch, fin, fout = 4, 32, 16
    energy = estimate_energy(nn.Linear(fin, fout).half(), torch.randn(batch, fin).half())
    macs = batch * fin * fout
    assert energy.compute_mj == pytest.approx(macs * (1.1 + 0.4) * 1e-9)
    assert energy.weight_bytes == (fin * fout + fout) * 2


def test_compute_dtype_overrides_the_weight_precision():
    energy = estimate_energy(nn.Linear(10, 10), torch.randn(2, 10), compute_dtype=torch.int8)
    assert energy.macs_by_precision == {"int8": 200}
    assert energy.compute_mj == pytest.approx(200 * (0.2 + 0.1) * 1e-9)


@pytest.mark.parametrize("dtype, row", [
    (torch.float32, "fp32"), (torch.float64, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16"),
    (torch.int8, "int8"), (torch.uint8, "int8"), (torch.qint8, "int8"), (torch.quint8, "int8"),
    (torch.int32, "int32"), (torch.int64, "int32"),
])
def test_precision_rows(dtype, row):
    assert precision_of(dtype) == row
