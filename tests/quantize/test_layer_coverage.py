"""Quantization of the layer types users bring beyond Linear/Conv2d: Conv1d, LSTM/GRU and their cells."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.record import last_record
from slimkit.quantize.conv1d import Conv1dAs2d, liftable_reason
from slimkit.quantize.recurrent import QuantRecurrent
from slimkit.runtime import build, resolve_backend
from tests.conftest import sqnr_db
from tests.models import sequence, tiny_task

CONV1D = [  # (conv, input)
    (lambda: nn.Conv1d(4, 8, 3, padding=1), (2, 4, 20)),
    (lambda: nn.Conv1d(4, 8, 5, stride=2, dilation=2, bias=False), (2, 4, 31)),
    (lambda: nn.Conv1d(8, 8, 3, groups=8, padding="same"), (2, 8, 17)),
    (lambda: nn.Conv1d(4, 6, 3, padding="valid"), (4, 20)),  # unbatched
]


@pytest.mark.parametrize("make,shape", CONV1D)
def test_conv1d_runs_as_conv2d_with_identical_outputs(make, shape):
    torch.manual_seed(0)
    conv = make().eval()
    x = torch.randn(*shape)
    lifted = Conv1dAs2d.from_conv1d(conv)
    assert liftable_reason(conv) == ""
    assert torch.allclose(lifted(x), conv(x), atol=1e-6)
    assert Conv1dAs2d.empty(lifted.spec()).spec() == lifted.spec()


@pytest.mark.parametrize("conv,reason", [
    (nn.Conv1d(4, 8, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv1d(4, 8, 4, padding="same"), "asymmetrically"),
])
def test_conv1d_that_cannot_be_lifted_says_why(conv, reason):
    assert reason in liftable_reason(conv)


RECURRENT = [  # (layer, input, hx)
    (lambda: nn.LSTM(16, 32), (20, 3, 16), None),
    (lambda: nn.LSTM(16, 32, 2, batch_first=True, bidirectional=True), (3, 20, 16), None),
    (lambda: nn.GRU(16, 32, 2), (20, 3, 16), None),
    (lambda: nn.GRU(16, 32, batch_first=True, bidirectional=True), (3, 20, 16), None),
    (lambda: nn.LSTM(16, 32), (20, 16), None),  # unbatched
    (lambda: nn.LSTM(16, 32), (20, 3, 16), "state"),
    (lambda: nn.GRU(16, 32), (20, 3, 16), "state"),
    (lambda: nn.LSTMCell(16, 32), (3, 16), None),
    (lambda: nn.GRUCell(16, 32), (3, 16), "state"),
    (lambda: nn.LSTMCell(16, 32), (16,), "state"),  # unbatched cell
]


def _state(rnn: nn.Module, shape: tuple) -> object:
    g = torch.Generator().manual_seed(3)
    if isinstance(rnn, nn.RNNCellBase):
        h = torch.randn(*shape[:-1], rnn.hidden_size, generator=g)
    else:
        batch = (shape[0] if rnn.batch_first else shape[1],) if len(shape) == 3 else ()
        h = torch.randn(rnn.num_layers * (2 if rnn.bidirectional else 1), *batch, rnn.hidden_size, generator=g)
    return (h, torch.randn_like(h)) if isinstance(rnn, (nn.LSTM, nn.LSTMCell)) else h


def _flat(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.flatten()
    return torch.cat([_flat(o) for o in out])


@pytest.mark.parametrize("make,shape,hx", RECURRENT)
@pytest.mark.parametrize("bits,min_db", [(8, 30.0), (4, 15.0)])
def test_quantized_recurrent_layers_track_the_float_ones(make, shape, hx, bits, min_db):
    torch.manual_seed(0)
    rnn = make().eval()
    x = torch.randn(*shape)
    state = _state(rnn, shape) if hx else None
    q = QuantRecurrent.from_float(rnn, bits=bits, group_size=16 if bits == 4 else 0,
                                  activations="dynamic" if bits == 8 else "none")
    with torch.no_grad():
        ref, out = rnn(x, state), q(x, state)
        twin = q.to_float()(x, state)
    assert _flat(out).shape == _flat(ref).shape
    assert sqnr_db(_flat(ref), _flat(out)) > min_db
    # the float twin (PackedSequence path) carries the same dequantized weights
    assert sqnr_db(_flat(ref), _flat(twin)) > min_db


def test_packed_sequences_run_on_the_dequantized_float_layer():
    torch.manual_seed(0)
    rnn = nn.LSTM(8, 16, batch_first=True).eval()
    x = torch.randn(3, 10, 8)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([10, 7, 4]), batch_first=True)
    q = QuantRecurrent.from_float(rnn)
    with torch.no_grad():
        ref, _ = nn.utils.rnn.pad_packed_sequence(rnn(packed)[0], batch_first=True)
        out, _ = nn.utils.rnn.pad_packed_sequence(q(packed)[0], batch_first=True)
    assert sqnr_db(ref, out) > 30


@pytest.fixture(scope="module")
def sequence_task():
    return tiny_task(sequence)


@pytest.mark.parametrize("config,min_db,max_size", [
    (sk.quantize.Int8(), 30.0, 0.5),
    (sk.quantize.Int8(activations="static"), 30.0, 1.05),
    (sk.quantize.WeightOnly(bits=4, group_size=32), 15.0, 0.4),
])
def test_conv1d_and_lstm_model_is_quantized_through(sequence_task, config, min_db, max_size, tmp_path):
    task = sequence_task
    q = sk.apply(task.model, config, task)
    x = task.example
    with torch.no_grad():
        ref, out = task.model(*x), q(*x)
    assert sqnr_db(ref, out) > min_db
    record = last_record(q)
    assert isinstance(q.conv, Conv1dAs2d)  # the conv is quantized as a (k, 1) Conv2d
    assert "conv" not in record.skipped
    if getattr(config, "activations", "") == "static":  # no static recurrent kernel: the LSTM is listed float with the reason
        assert "recurrent" in record.skipped["lstm"]
        assert isinstance(q.lstm, nn.LSTM)
    else:
        assert isinstance(q.lstm, QuantRecurrent)
        assert "lstm" not in record.skipped
    sk.save(task.model, tmp_path / "fp32")
    sk.save(q, tmp_path / "q")
    size = sum(f.stat().st_size for f in (tmp_path / "q").iterdir())
    assert size / sum(f.stat().st_size for f in (tmp_path / "fp32").iterdir()) < max_size
    with torch.no_grad():
        assert torch.equal(sk.load(tmp_path / "q")(*x), out)


def test_auto_runtime_runs_int8_recurrent_layers_on_onnxruntime(sequence_task):
    q = sk.apply(sequence_task.model, sk.quantize.Int8(), sequence_task)
    assert resolve_backend(q, "auto") == "onnxruntime"  # the LSTM as DynamicQuantizeLSTM (tests/runtime/test_ort_recurrent.py)
    runnable = build(q, "auto", sequence_task.example)
    with torch.no_grad():
        assert sqnr_db(q(*sequence_task.example), runnable(*sequence_task.example)) > 30


def test_a_model_of_only_recurrent_layers_is_quantized():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(8, 16)).eval()
    q = sk.apply(model, sk.quantize.Int8(), None)
    x = torch.randn(12, 2, 8)
    with torch.no_grad():
        assert sqnr_db(model(x)[0], q(x)[0]) > 30


class ReadsWeights(nn.Module):
    """Code that reads its layers' ``.weight`` (HF ViT casts its input to the patch embedding's dtype)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, stride=4)
        self.mix = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x.to(self.patch.weight.dtype)).flatten(2)          # (B, 32, 16)
        h = self.mix(h.to(self.mix.weight.dtype)) * self.mix.weight.shape[-1] / 3
        return self.head(h.mean(-1).to(self.head.weight.dtype))          # (B, 4)


@pytest.mark.parametrize("config,min_db", [
    (sk.quantize.Int8(), 30.0),
    (sk.quantize.WeightOnly(bits=4, group_size=32), 12.0),
    (sk.quantize.WeightOnly(bits=8), 30.0),
])
def test_quantized_layers_keep_a_float_weight_for_code_that_reads_it(config, min_db):
    torch.manual_seed(0)
    model, x = ReadsWeights().eval(), torch.randn(4, 3, 16, 16)
    task = sk.Task(name="reads", model=model, example=(x,), metric=lambda m, d: {"score": 1.0}, eval=[], calib=[(x,)])
    q = sk.apply(model, config, task)
    assert not last_record(q).skipped  # every layer converted
    assert q.patch.weight.shape == (32, 3, 4, 4) and q.mix.weight.shape == (32, 32, 3)
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) >= min_db


TRANSPOSED = [  # (layer, input)
    (lambda: nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), (2, 16, 6, 6)),
    (lambda: nn.ConvTranspose2d(16, 8, 3, stride=2, output_padding=1, groups=4, bias=False), (2, 16, 5, 5)),
    (lambda: nn.ConvTranspose1d(8, 4, 5, stride=2, dilation=2), (3, 8, 17)),
    (lambda: nn.ConvTranspose1d(8, 6, 3), (8, 11)),  # unbatched, odd K = 6/1 * 3 per row
]


@pytest.mark.parametrize("bits,min_db,max_bytes", [(8, 38.0, 0.35), (4, 16.0, 0.25)])  # scales: 4 B per row
@pytest.mark.parametrize("make,shape", TRANSPOSED)
def test_transposed_convs_are_stored_int8_or_int4_and_reload_exactly(make, shape, bits, min_db, max_bytes, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(make()).eval()
    x = torch.randn(*shape)
    task = sk.Task(name="t", model=model, example=(x,), metric=lambda m, d: {"score": 1.0}, eval=[], calib=[(x,)])
    q = sk.apply(model, sk.quantize.WeightOnly(bits=bits, group_size=32 if bits == 4 else 0), task)
    assert type(q[0]).__name__ == "QuantConvTranspose" and not last_record(q).skipped
    assert q[0].weight.shape == model[0].weight.shape
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) >= min_db
    stored = q[0].codes.numel() * q[0].codes.element_size() + 4 * q[0].scale.numel()
    assert stored <= max_bytes * 4 * model[0].weight.numel()  # bytes of the weight against fp32
    sk.save(q, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(sk.load(tmp_path / "q", model=nn.Sequential(make()))(x), q(x))


def test_int8_with_activations_lists_transposed_convs_with_what_to_use_instead():
    from tests.models import unet

    task = tiny_task(unet)
    q = sk.apply(task.model, sk.quantize.Int8(), task)
    assert "WeightOnly stores it int8/int4" in last_record(q).skipped["up"]


ATTENTION = [  # (MultiheadAttention, query shape, key/value shape, call options)
    (lambda: nn.MultiheadAttention(32, 4, batch_first=True), (2, 6, 32), (2, 6, 32), {}),
    (lambda: nn.MultiheadAttention(32, 4), (6, 2, 32), (5, 2, 32), {"need_weights": False}),
    (lambda: nn.MultiheadAttention(32, 4, kdim=16, vdim=24, batch_first=True), (2, 6, 32), (2, 5, 16), {}),
    (lambda: nn.MultiheadAttention(32, 2, bias=False, add_bias_kv=True, batch_first=True), (2, 6, 32), (2, 6, 32),
     {"key_padding_mask": "pad"}),
    (lambda: nn.MultiheadAttention(32, 4, batch_first=True), (2, 6, 32), (2, 6, 32), {"attn_mask": "causal"}),
    (lambda: nn.MultiheadAttention(32, 4), (6, 32), (6, 32), {}),  # unbatched
]


@pytest.mark.parametrize("bits,min_db", [(8, 35.0), (4, 15.0)])
@pytest.mark.parametrize("make,q_shape,kv_shape,options", ATTENTION)
def test_multihead_attention_is_stored_int8_or_int4_with_its_interface(make, q_shape, kv_shape, options, bits, min_db,
                                                                       tmp_path):
    from slimkit.quantize.multihead import QuantMultiheadAttention

    torch.manual_seed(0)
    mha = make().eval()
    g = torch.Generator().manual_seed(1)
    q_in, k_in = torch.randn(*q_shape, generator=g), torch.randn(*kv_shape[:-1], mha.kdim, generator=g)
    v_in = torch.randn(*kv_shape[:-1], mha.vdim, generator=g)
    kwargs = dict(options)
    if kwargs.get("key_padding_mask") == "pad":
        kwargs["key_padding_mask"] = torch.zeros(kv_shape[0], kv_shape[1], dtype=torch.bool)
        kwargs["key_padding_mask"][:, -2:] = True
    if kwargs.get("attn_mask") == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(q_shape[1])
    q = QuantMultiheadAttention.from_float(mha, bits)
    with torch.no_grad():
        (out, weights), (ref, ref_weights) = q(q_in, k_in, v_in, **kwargs), mha(q_in, k_in, v_in, **kwargs)
        assert out.shape == ref.shape and sqnr_db(ref, out) >= min_db
        assert (weights is None) == (ref_weights is None)
        if weights is not None:
            assert sqnr_db(ref_weights, weights) >= min_db
        stored = sum(b.numel() * b.element_size() for n, b in q.named_buffers() if n.endswith("_codes"))
        assert stored <= (0.26 if bits == 8 else 0.14) * 4 * sum(
            p.numel() for n, p in mha.named_parameters() if n.endswith("weight"))
        sk.save(nn.Sequential(q), tmp_path / "m")
        back = sk.load(tmp_path / "m", model=nn.Sequential(make()))
        assert torch.equal(back[0](q_in, k_in, v_in, **kwargs)[0], out)
