"""Quantized LSTM / GRU / cells on ONNX Runtime: the LSTM on ``DynamicQuantizeLSTM`` with slimkit's
integers, the GRU float and listed, cells on integer MatMuls, every one close to fp32 torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import slimkit as sk  # noqa: E402
from slimkit.formats.pack import quantize_weight_int8  # noqa: E402
from slimkit.runtime import build, resolve_backend  # noqa: E402
from tests.conftest import sqnr_db  # noqa: E402


class AudioNet(nn.Module):
    """(B, 4, T) -> Conv1d -> recurrent layer -> last step -> classifier."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.conv, self.rnn, self.head = nn.Conv1d(4, 16, 3, padding=1), rnn, nn.Linear(
            rnn.hidden_size * (2 if rnn.bidirectional else 1), 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))                                    # (B, 16, T)
        h = h.transpose(1, 2) if self.rnn.batch_first else h.permute(2, 0, 1)
        out, _ = self.rnn(h)                                            # (B, T, H) or (T, B, H)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])  # (B, 4)


class CellNet(nn.Module):
    """An LSTMCell stepped in Python (a voice-activity detector's shape): the export unrolls the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.cell, self.head = nn.LSTMCell(4, 24), nn.Linear(24, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 4)
        h = c = x.new_zeros(x.shape[0], 24)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)                                             # (B, 2)


def _quantized(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The float model and its int8 (dynamic) copy."""
    model = model.eval()
    return model, sk.apply(model, sk.quantize.Int8(), None)


CASES = [  # (model, input shape, the gates' op on ORT, integer?, SQNR floor vs fp32 torch; measured 46.5 48.0 45.3 48.2)
    (lambda: AudioNet(nn.LSTM(16, 32, batch_first=True)), (8, 4, 24), "DynamicQuantizeLSTM", True, 42.0),
    (lambda: AudioNet(nn.LSTM(16, 24, 2, bidirectional=True)), (8, 4, 24), "DynamicQuantizeLSTM", True, 42.0),
    (lambda: AudioNet(nn.GRU(16, 32, 2, batch_first=True)), (8, 4, 24), "GRU", False, 42.0),
    (CellNet, (8, 12, 4), "DynamicQuantizeMatMul", True, 42.0),
]


@pytest.mark.parametrize("make,shape,op,integer,min_db", CASES, ids=["lstm", "bilstm-2", "gru-2", "lstmcell"])
def test_recurrent_int8_runs_on_onnxruntime_integer_or_listed_float(make, shape, op, integer, min_db):
    torch.manual_seed(0)
    model, q = _quantized(make())
    x = torch.randn(*shape)
    assert resolve_backend(q, "auto") == "onnxruntime"
    run = build(q, "auto", (x,), threads=1)
    gates = sorted({n for n in [*run.layer_kernels, *run.skipped] if ".gates." in n})
    if integer:
        assert gates and not any(".gates." in n for n in run.skipped)
        assert all(run.layer_kernels[g] == op for g in gates)
    else:  # ORT has no integer GRU: every gate matrix is listed float with the reason
        assert sorted(g for g in run.skipped if ".gates." in g) == sorted(gates) and len(gates) == 4
        assert all("no integer GRU" in run.skipped[g] for g in gates)
        assert run.kernels["GRU"] == 2
    x2 = torch.randn(2 * shape[0], *shape[1:])  # another batch than the example's
    with torch.no_grad():
        ref, tq = model(x2), q(x2)
    got = run(x2)
    assert sqnr_db(ref, got) >= min_db
    assert sqnr_db(tq, got) >= 36.0  # ORT and torch round activations differently (measured 40.5 44.2 37.8 41.2)


def test_the_onnx_graph_holds_dynamic_quantize_lstm_with_slimkits_integers():
    torch.manual_seed(0)
    model, q = _quantized(AudioNet(nn.LSTM(16, 32, batch_first=True)))
    x = torch.randn(8, 4, 24)
    run = build(q, "onnxruntime", (x,), threads=1)
    graph = onnx.load(run.path).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DynamicQuantizeLSTM") == 1 and "LSTM" not in ops
    node = next(n for n in graph.node if n.op_type == "DynamicQuantizeLSTM")
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    w, r = init[node.input[1]], init[node.input[2]]                 # (1, In, 4H), (1, H, 4H) int8
    iofc = [0, 3, 1, 2]  # torch's gate blocks i, f, g, o in ONNX's order i, o, f, c
    for stored, weight in ((w, model.rnn.weight_ih_l0), (r, model.rnn.weight_hh_l0)):
        ours = quantize_weight_int8(weight.detach(), True)[0].numpy()  # (4H, In): slimkit's int8 rows
        ours = np.concatenate([ours.reshape(4, 32, -1)[i] for i in iofc])
        # int8, or the same integers as uint8 + 127 where ORT's u8s8 kernels saturate (ort._avoid_saturation)
        as_int = stored.astype(np.int16) - (127 if stored.dtype == np.uint8 else 0)
        np.testing.assert_array_equal(as_int[0].T, ours)


def test_weight_only_recurrent_models_still_run_on_torch():
    torch.manual_seed(0)
    model = AudioNet(nn.LSTM(16, 32, batch_first=True)).eval()
    q = sk.apply(model, sk.quantize.WeightOnly(bits=4, group_size=32), None)
    assert resolve_backend(q, "auto") == "torch"


class Call(nn.Module):
    """Calls a recurrent layer the ways users do: unbatched, with a given state; returns the output sequence."""

    def __init__(self, rnn: nn.Module, hx: object) -> None:
        super().__init__()
        self.rnn, self.hx = rnn, hx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x) if self.hx is None else self.rnn(x, self.hx)
        return out[0] if isinstance(out, tuple) else out


INTERFACE = [  # (layer, input shape, state shape or None); measured SQNR 42.7 42.7 50.5 49.1 50.5
    (lambda: nn.LSTM(16, 32), (20, 16), None),                                   # unbatched
    (lambda: nn.LSTM(16, 32), (20, 3, 16), (1, 3, 32)),                          # (h0, c0) given
    (lambda: nn.GRU(16, 32), (20, 3, 16), (1, 3, 32)),                           # h0 given
    (lambda: nn.GRU(16, 32, batch_first=True, bidirectional=True), (3, 20, 16), None),
    (lambda: nn.GRUCell(16, 32), (3, 16), (3, 32)),
]


@pytest.mark.parametrize("make,shape,state", INTERFACE, ids=["lstm-unbatched", "lstm-state", "gru-state",
                                                             "bigru-batch-first", "grucell-state"])
def test_recurrent_interfaces_export_and_stay_close_on_onnxruntime(make, shape, state):
    torch.manual_seed(0)
    rnn = make().eval()
    hx = None if state is None else torch.randn(*state)
    if hx is not None and isinstance(rnn, nn.LSTM):
        hx = (hx, torch.randn(*state))
    model, q = _quantized(Call(rnn, hx))
    x = torch.randn(*shape)
    run = build(q, "onnxruntime", (x,), threads=1)  # build's output check already held on x
    with torch.no_grad():
        assert sqnr_db(model(x), run(x)) >= 40.0
