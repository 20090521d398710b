"""The report's per-layer error table: every quantized layer has a row (int4 per-channel Bit* layers too), and a
step that ran an algorithm shows each layer's SQNR with the algorithm off ("before") and on ("after")."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import StepView, records_of
from slimkit.core.registry import technique_of
from slimkit.core.task import Task
from slimkit.quantize import BiasCorrection, CrossLayerEqualization, Int8, SmoothQuant, WeightOnly
from slimkit.quantize.adaround import AdaRound
from slimkit.quantize.layer_error import layer_errors
from slimkit.report import Report
from slimkit.train.recover import Finetune
from tests.models import cnn, encoder, mlp, sequence, tiny_task, unet
from tests.quantize.test_awq import salient_task
from tests.quantize.test_equalization import PER_TENSOR, _mobile
from tests.quantize.test_equalization import _task as mobile_task
from tests.quantize.test_smoothquant import NormQKV


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny models, one thread


def norm_task() -> Task:
    """NormQKV: three LayerNorm channels x100 feeding q, k, v (SmoothQuant's planted outliers)."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 6, 32, generator=gen),) for _ in range(4)]  # (B, T, 32)
    return Task("norm", NormQKV().eval(), batches[0], metric=lambda run, d: 0.0, eval=None, calib=batches)


def cnn_task() -> Task:
    return tiny_task(cnn, batches=4)


def report_of(task: Task, steps: list[Any]) -> Report:
    """Apply ``steps`` one at a time and write each new record's report section, as ``run_recipe`` does."""
    models = [task.model]
    for step in steps:
        models.append(sk.apply(models[-1], step, task))
    report = Report("layer errors")
    for i, step in enumerate(steps):
        for record in records_of(models[i + 1])[len(records_of(models[i])):]:
            technique_of(type(step)).config.report_section(report, record, StepView(models[i], models[i + 1], task))
    return report


#: name -> (task, steps, algorithm named in the rows, layers that must gain, least gain (dB) over them, the
#: least gain (dB, may be negative) any compared layer may show). Measured SQNR before -> after (dB) above each.
CASES: dict[str, tuple[Callable[[], Task], list[Any], str, tuple[str, ...], float, float]] = {
    # q 31.6 -> 40.7, k 31.9 -> 41.1, v 30.0 -> 41.8, down 33.0 -> 42.2
    "SmoothQuant": (norm_task, [SmoothQuant(alpha=0.5), Int8(activations="static", backend="torch")],
                    "SmoothQuant", ("q", "k", "v"), 6.0, -1.0),
    # 1: 19.2 -> 31.7, 3: 23.0 -> 34.2
    "AWQ": (salient_task, [WeightOnly(bits=4, group_size=32, method="awq")], "AWQ", ("1", "3"), 8.0, 0.0),
    # 1: 19.2 -> 32.3, 3: 23.0 -> 41.5
    "AWQ+GPTQ": (salient_task, [WeightOnly(bits=4, group_size=32, method="awq+gptq")], "AWQ+GPTQ", ("1", "3"),
                 8.0, 0.0),
    # 1: 19.2 -> 18.9 (the LayerNorm's 20-50x channels: GPTQ alone does not help there), 3: 23.0 -> 32.9
    "GPTQ": (salient_task, [WeightOnly(bits=4, group_size=32, method="gptq")], "GPTQ", ("3",), 3.0, -1.0),
    # int4 per channel (BitConv2d / BitLinear): 4: 22.1 -> 23.8, 9: 22.4 -> 25.1, 0 and 11 kept nearest
    "AdaRound int4 per channel": (cnn_task, [AdaRound(bits=4, iterations=100)], "AdaRound", ("4", "9"), 1.0,
                                  -0.05),
    # 9: 44.2 -> 45.4, 11: 58.3 -> 59.0, 4: 38.4 -> 38.6, 0: 40.2 -> 40.2
    "AdaRound re-rounding static int8": (cnn_task, [Int8(activations="static", backend="torch"),
                                                    AdaRound(iterations=100)], "AdaRound", (), 0.0, -0.05),
    # pw 1.7 -> 38.0 (the planted 1000x channel spread), dw 37.8 -> 37.4, conv0 and fc unchanged
    "CLE": (lambda: mobile_task(_mobile(nn.ReLU)), [CrossLayerEqualization(), PER_TENSOR], "CLE", ("pw",),
            30.0, -1.0),
    # fc 47.9 -> 50.1, pw 1.7 -> 3.6, dw 37.8 -> 37.9
    "bias correction": (lambda: mobile_task(_mobile(nn.ReLU)), [PER_TENSOR, BiasCorrection()], "bias correction",
                        ("fc",), 1.0, -0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_report_rows_carry_sqnr_before_and_after_the_algorithm(case):
    make, steps, algorithm, gainers, least_gain, floor = CASES[case]
    task = make()
    report = report_of(task, steps)
    rows = [r for r in report.data["layer_errors"] if r["sqnr_before_db"] is not None]
    assert rows and all(r["algorithm"] == algorithm for r in rows)
    gain = {r["name"]: r["sqnr_db"] - r["sqnr_before_db"] for r in rows}
    assert set(gainers) <= set(gain)
    assert all(gain[n] >= least_gain for n in gainers), gain
    assert min(gain.values()) >= floor, gain
    page = report.html()
    assert "SQNR before → after (dB)" in page and algorithm in page
    best = max(rows, key=lambda r: r["sqnr_db"] - r["sqnr_before_db"])
    assert f"{best['sqnr_before_db']:.1f} → {best['sqnr_db']:.1f}" in page


#: name -> (task, the steps with the algorithm, the same quantization with it off)
PLAIN = {
    "SmoothQuant": (norm_task, [SmoothQuant(alpha=0.5), Int8(activations="static", backend="torch")],
                    Int8(activations="static", backend="torch")),
    "AWQ": (salient_task, [WeightOnly(bits=4, group_size=32, method="awq")], WeightOnly(bits=4, group_size=32)),
}


@pytest.mark.parametrize("case", PLAIN)
def test_before_is_the_same_quantization_with_the_algorithm_off(case):
    make, steps, plain = PLAIN[case]
    task = make()
    rows = report_of(task, steps).data["layer_errors"]
    alone = {r.name: r.sqnr_db for r in layer_errors(task.model, sk.apply(task.model, plain, task), task.calib)}
    assert {r["name"]: r["sqnr_before_db"] for r in rows} == pytest.approx(alone, abs=1e-6)


@pytest.mark.parametrize("steps", [[Int8(activations="static", backend="torch")], [WeightOnly(bits=4, group_size=32)]],
                         ids=["static int8", "rtn int4"])
def test_no_algorithm_no_before_column(steps):
    report = report_of(salient_task(), steps)
    assert report.data["layer_errors"] and all(r["sqnr_before_db"] is None for r in report.data["layer_errors"])
    assert "before → after" not in report.html()


#: model, config: every Conv / Linear / embedding table the config quantized must have a row
COVERAGE = {
    "AdaRound int4 per channel, cnn": (cnn, AdaRound(bits=4, iterations=0)),
    "AdaRound int4 per channel, mlp": (mlp, AdaRound(bits=4, iterations=0)),
    "WeightOnly int4, cnn (convs per channel)": (cnn, WeightOnly(bits=4, group_size=32)),
    "Int8, Conv1d run as a (k, 1) Conv2d": (sequence, Int8(activations="dynamic", backend="torch")),
    "WeightOnly int8, transposed conv": (unet, WeightOnly(bits=8)),
    "Int8, embedding table": (encoder, Int8(activations="dynamic", backend="torch")),
}
#: several input or output tensors: no single-layer SQNR (listed in the record, no row)
NO_ROW = (nn.LSTM, nn.GRU, nn.MultiheadAttention)


@pytest.mark.parametrize("case", COVERAGE)
def test_every_quantized_layer_has_a_row(case):
    factory, config = COVERAGE[case]
    task = tiny_task(factory, batches=2)
    q = sk.apply(task.model, config, task)
    record = records_of(q)[-1]
    floats = dict(task.model.named_modules())
    lifted = {n: n.removesuffix(".conv") if n not in floats else n for n in record.layers + record.embeddings}
    expected = {n for n in lifted.values() if not isinstance(floats[n], NO_ROW)}
    rows = {r.name: r for r in layer_errors(task.model, q, task.calib)}
    assert expected and set(rows) == expected
    assert all(r.sqnr_db > 10.0 for r in rows.values()), {n: r.sqnr_db for n, r in rows.items()}


def test_cle_then_bias_correction_show_one_table_each():
    """[CLE, Int8, BiasCorrection]: the Int8 step's table compares with plain int8, the correction's with CLE + int8."""
    report = report_of(mobile_task(_mobile(nn.ReLU)), [CrossLayerEqualization(), PER_TENSOR, BiasCorrection()])
    gain = {(r["algorithm"], r["name"]): r["sqnr_db"] - r["sqnr_before_db"] for r in report.data["layer_errors"]}
    assert {a for a, _ in gain} == {"CLE", "bias correction"} and len(gain) == 8
    assert gain["CLE", "pw"] >= 30.0  # measured 1.7 -> 38.0 dB
    assert gain["bias correction", "fc"] >= 1.0  # measured 47.9 -> 50.4 dB
    assert report.html().count("SQNR before → after (dB)") == 2


def test_a_training_step_before_the_algorithm_is_not_replayed():
    task = tiny_task(encoder, batches=4)
    report = report_of(task, [Finetune(steps=2), SmoothQuant(alpha=0.5), Int8(activations="static", backend="torch")])
    rows = report.data["layer_errors"]
    assert rows and all(r["sqnr_before_db"] is None for r in rows)  # the plain table still comes
    assert "SmoothQuant: no SQNR before (replaying the earlier step train.Finetune would train again)" in report.html()
