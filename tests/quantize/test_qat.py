"""QAT: straight-through and LSQ gradients, BN folding, and the converted model on the real runtimes."""

import copy

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.core.task import Task
from slimkit.quantize import QuantConv2d, QuantLinear
from slimkit.quantize._ste import fake_quant, lsq, lsq_grad_scale
from slimkit.quantize.extreme_modules import BitConv2d, BitLinear
from slimkit.quantize.qat import QAT, convert, prepare, ptq_start
from slimkit.quantize.qat_modules import QATConv2d, QATLinear, mse_step
from slimkit.runtime import build
from tests.conftest import sqnr_db


def test_ste_gradient_is_identity_inside_and_zero_outside():
    x = torch.linspace(-3, 3, 601, requires_grad=True)
    scale = torch.tensor(0.01)  # int8 range covers [-1.27, 1.27]
    fake_quant(x, scale, 0.0, -127, 127).sum().backward()
    inside = x.detach().abs() <= 1.27
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[~inside], torch.zeros(int((~inside).sum())))
    assert int(inside.sum()) == 255  # the grid really clips where we think


def test_lsq_step_gradient_matches_closed_form_and_finite_difference():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=gen) * 0.5
    c = torch.randn(64, generator=gen)  # loss = sum(c * q(x))
    step = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    xd, cd = x.double(), c.double()
    (cd * lsq(xd, step, 0.0, -8, 7, 64)).sum().backward()
    v = xd / 0.1
    inside = (v >= -8) & (v <= 7)
    local = torch.where(inside, torch.round(v) - v, v.clamp(-8, 7))  # LSQ's d q / d s
    expected = float((cd * local).sum()) * lsq_grad_scale(64, 7)
    assert float(step.grad) == pytest.approx(expected, rel=1e-9)
    # Finite difference of the straight-through surrogate (rounding offset frozen at s = 0.1).
    offset = torch.round(v.clamp(-8, 7)) - v.clamp(-8, 7)

    def surrogate(s: float) -> float:
        return float((cd * (torch.clamp(xd / s, -8, 7) + offset) * s).sum())

    h = 1e-6
    fd = (surrogate(0.1 + h) - surrogate(0.1 - h)) / (2 * h)
    assert float(step.grad) / lsq_grad_scale(64, 7) == pytest.approx(fd, rel=1e-5)


def test_folded_batchnorm_gives_the_same_float_outputs(mnist_task):
    from slimkit.architecture.fuse import fold_batchnorm

    model = mnist_task.model
    x = mnist_task.eval[0][0][0]
    folded, names = fold_batchnorm(copy.deepcopy(model), (x,))
    assert names == ["1", "5", "9"]
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) <= 1e-5


def test_converted_integers_are_the_fake_quant_weights():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    for bits, group in ((8, 0), (4, 32)):
        qat = QATLinear.from_float(lin, bits=bits, group_size=group, activations="none", act_range=None,
                                   symmetric=True, learn=True)
        with torch.no_grad():
            qat.wq.log_step.add_(0.3)  # a learned step, not the max-abs one
            fq = qat.wq(qat.weight)
        q = qat.convert()
        assert isinstance(q, QuantLinear) and q.bits == bits
        assert torch.equal(q.dequantized_weight(), fq)
        if bits == 8:  # each channel's largest weight sits on +-127: max-abs re-quantization (ORT) agrees
            assert torch.equal(q.qweight.abs().amax(1), torch.full((16,), 127, dtype=torch.int8))


def _tiny_task() -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 8))
    x = torch.randn(256, 32)
    y = (x[:, :8] * 3).argmax(-1)
    batches = [((x[i:i + 64],), y[i:i + 64]) for i in range(0, 256, 64)]
    import torch.nn.functional as F

    from slimkit.core.task import accuracy

    return Task(name="tiny", model=model.eval(), example=(x[:4],), metric=accuracy, eval=batches,
                calib=[b[0] for b in batches], train=batches, loss=F.cross_entropy)


def test_prepare_convert_replace_every_target_layer():
    task = _tiny_task()
    model = copy.deepcopy(task.model)
    prepare(model, QAT(bits=8), task)
    assert sorted(last_record(model).layers) == ["0", "3"]
    convert(model)
    assert isinstance(model[0], QuantLinear) and model[0].activations == "static"
    with pytest.raises(SlimkitError, match="no QAT layers"):
        convert(model)


@pytest.mark.slow
def test_qat_int8_runs_on_onnxruntime_and_records_its_accuracy(mnist_task, one_thread):
    q = sk.apply(mnist_task.model, QAT(bits=8, steps=30, symmetric=False, backend="onnxruntime"), mnist_task)
    info = last_record(q).training
    assert info.folded_bn == ["1", "5", "9"] and info.steps == 30
    assert sum(isinstance(m, QuantConv2d) for m in q.modules()) == 3
    run = build(q, "onnxruntime", mnist_task.example)
    assert run.kernels["QLinearConv"] == 3
    score = mnist_task.evaluate(run)["score"]
    assert score == info.score  # the recorded accuracy is the deployed runtime's
    assert score >= 0.985  # fp32: 0.990
    x = mnist_task.eval[0][0][0]
    with torch.no_grad():
        assert sqnr_db(q(x), run(x)) > 25  # torch emulation vs ORT's integer kernels


@pytest.mark.slow
def test_qat_int4_weight_only_reloads_identically(mnist_task, one_thread, tmp_path):
    q = sk.apply(mnist_task.model, QAT(bits=4, weight_only=True, steps=30, group_size=32), mnist_task)
    assert last_record(q).layers == ["13", "15"]  # the two Linear layers; convs stay float at int4
    assert last_record(q).training.score == mnist_task.evaluate(build(q, "torch"))["score"] >= 0.985
    sk.save(q, tmp_path / "m")
    back = sk.load(tmp_path / "m")
    x = mnist_task.eval[0][0][0]
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_config_round_trip_and_errors():
    c = QAT(bits=4, weight_only=True, steps=50, lr=1e-4, learn_scale=False, exclude=("fc",))
    assert BaseConfig.from_json(c.to_json()) == c
    with pytest.raises(SlimkitError, match="weight-only"):
        QAT(bits=4)
    with pytest.raises(SlimkitError, match="steps"):
        QAT(steps=0)
    with pytest.raises(SlimkitError, match="per_tensor"):
        QAT(bits=8, per_tensor=True)
    with pytest.raises(SlimkitError, match="training data"):
        sk.apply(nn.Linear(4, 4), QAT(), None)


def test_per_tensor_step_is_the_least_mse_clip_and_converts_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[0, 0] = 12.0  # one outlier: max-abs would waste most of the 16 levels on it
    step = float(mse_step(w))
    err = lambda s: float(((w / s).round().clamp(-8, 7) * s - w).pow(2).sum())  # noqa: E731
    assert err(step) < 0.5 * err(12.0 / 7)  # far better than the max-abs step
    assert all(err(step) <= err(f * 12.0 / 7) + 1e-9 for f in torch.linspace(0.2, 1.0, 81).tolist())
    conv = nn.Conv2d(3, 8, 3, padding=1)
    qc = QATConv2d.from_float(conv, activations="none", act_range=None, symmetric=True, learn=True, per_tensor=True)
    with torch.no_grad():
        qc.wq.log_step.add_(0.2)  # a learned step
        x = torch.randn(2, 3, 6, 6)
        expected = qc(x)
    stored = qc.convert()
    assert isinstance(stored, BitConv2d) and stored.bits == 4 and stored.packed.shape == (8, 14)  # 27 codes
    assert torch.equal(stored.scale_pos, qc.wq.log_step.exp().detach().expand(8))
    with torch.no_grad():
        assert torch.allclose(stored(x), expected, atol=1e-5)


def test_per_tensor_lsq_step_gradient_matches_finite_difference():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    c = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    lin = QATLinear.from_float(nn.Linear(8, 16), bits=4, group_size=0, activations="none", act_range=None,
                               symmetric=True, learn=True, per_tensor=True).double()
    s0 = float(lin.wq.log_step.detach().exp())
    (c * lin.wq(w)).sum().backward()
    v = w / s0
    offset = torch.round(v.clamp(-8, 7)) - v.clamp(-8, 7)  # rounding frozen at s0: the STE surrogate

    def surrogate(s: float) -> float:
        return float((c * (torch.clamp(w / s, -8, 7) + offset) * s).sum())

    h = 1e-7
    fd = (surrogate(s0 + h) - surrogate(s0 - h)) / (2 * h)
    # d/dlog s = s * d/ds, times LSQ's gradient scale 1/sqrt(numel * 7)
    assert float(lin.wq.log_step.grad) == pytest.approx(fd * s0 * lsq_grad_scale(w.numel(), 7), rel=1e-5)


@pytest.mark.slow
def test_qat_per_tensor_int4_recovers_what_ptq_loses_on_mnist(mnist_task, one_thread, tmp_path):
    config = QAT(bits=4, weight_only=True, per_tensor=True, steps=300, lr=5e-4)
    ptq = ptq_start(mnist_task.model, config, mnist_task)
    q = sk.apply(mnist_task.model, config, mnist_task)
    layers = [m for m in q.modules() if isinstance(m, (BitLinear, BitConv2d))]
    assert len(layers) == 5 and all(m.bits == 4 for m in layers)  # convolutions too
    fp32 = mnist_task.evaluate(mnist_task.model)["score"]  # 0.990
    before = mnist_task.evaluate(ptq)["score"]  # 0.983 (least-MSE step; max-abs: 0.973)
    after = mnist_task.evaluate(build(q, "torch"))["score"]
    assert after == last_record(q).training.score  # the recorded score is the runtime's
    assert before <= fp32 - 0.005 and after >= before + 0.004 and after >= fp32 - 0.01
    sk.save(q, tmp_path / "m")
    from slimkit.io import artifact_bytes

    assert artifact_bytes(tmp_path / "m") < 60_000  # fp32: 397,671 B
    x = mnist_task.eval[0][0][0]
    with torch.no_grad():
        assert torch.equal(sk.load(tmp_path / "m")(x), q(x))
