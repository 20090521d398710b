"""Cross-layer equalization and bias correction on a tiny MobileNet-style block with planted mis-scaled channels."""

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.core.task import Task
from slimkit.formats import pack
from slimkit.graph.batchnorm import folded_layer
from slimkit.pipeline.recipe import Recipe
from slimkit.quantize import BiasCorrection, BiasCorrectionRecord, CrossLayerEqualization, EqualizationRecord, Int8
from slimkit.quantize.equalization import RELU6
from tests.conftest import sqnr_db

PER_TENSOR = Int8(granularity="per_tensor", activations="static", backend="torch")


class TinyMobile(nn.Module):
    """conv-BN-act0 / depthwise-BN-ReLU / pointwise-ReLU, pooled into a Linear head; input (B, 3, 8, 8)."""

    def __init__(self, act0: type[nn.Module]) -> None:
        super().__init__()
        self.conv0, self.bn0, self.act0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), act0()
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.pool, self.fc = nn.Conv2d(16, 24, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 10)
        x = self.act0(self.bn0(self.conv0(x)))  # (B, 16, 8, 8)
        x = torch.relu(self.bn1(self.dw(x)))  # (B, 16, 8, 8)
        x = self.pool(torch.relu(self.pw(x)))  # (B, 24, 1, 1)
        return self.fc(torch.flatten(x, 1))


def _mobile(act0: type[nn.Module] = nn.ReLU6) -> nn.Module:
    """BN statistics from data; then depthwise channel i scaled by c_i (1000x spread) and pointwise input i by 1/c_i:
    the same function, but per-tensor int8 rounds the small depthwise channels away."""
    torch.manual_seed(0)
    model = TinyMobile(act0)
    gen = torch.Generator().manual_seed(0)
    for bn in (model.bn0, model.bn1):
        bn.momentum = None  # running stats = the plain average over the batches below
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.randn(32, 3, 8, 8, generator=gen))
        c = torch.logspace(-2, 1, 16)[torch.randperm(16, generator=gen)]  # (16,)
        model.bn1.weight.mul_(c)
        model.bn1.bias.add_(0.3).mul_(c)
        model.pw.weight.div_(c.reshape(1, -1, 1, 1))
    return model.eval()


def _task(model: nn.Module, calib: bool = True) -> Task:
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen),) for _ in range(4)]
    return Task(name="tiny", model=model, example=batches[0], metric=lambda run, d: 0.0, eval=None,
                calib=batches if calib else ())


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """Tiny convs run fastest on one thread, and do not stall when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEST_X = torch.randn(256, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _weight_sqnr(w: torch.Tensor) -> float:
    q, scale = pack.quantize_weight_int8(w, False)  # per-tensor
    return float(sqnr_db(w, pack.dequantize_int8(q, scale)))


def _error_bias(model: nn.Module, reference: torch.Tensor) -> float:
    """Mean over output channels of |mean error| (the part bias correction removes)."""
    with torch.no_grad():
        return float((model(TEST_X) - reference).mean(0).abs().mean())


# act0 -> (pairs, folded BatchNorms, skipped layers with reasons)
RELU_CASES = {
    "relu6": (nn.ReLU6, [["dw", "pw"]], ["bn1"], {"conv0": RELU6, "fc": "its output is the model's output"}),
    "relu": (nn.ReLU, [["conv0", "dw"], ["dw", "pw"]], ["bn0", "bn1"], {"fc": "its output is the model's output"}),
}


@pytest.mark.parametrize("case", RELU_CASES)
def test_cle_keeps_the_float_function_and_finds_the_pairs(case):
    act0, pairs, folded, skipped = RELU_CASES[case]
    model = _mobile(act0)
    out = sk.apply(model, CrossLayerEqualization(), _task(model))
    record = last_record(out, EqualizationRecord)
    assert (record.pairs, record.folded, record.skipped) == (pairs, folded, skipped)
    with torch.no_grad():
        assert float((out(TEST_X) - model(TEST_X)).abs().max()) <= 1e-5
    # equalized: each pair's output ranges of the first equal the input ranges of the second
    for first, second in pairs:
        r1 = out.get_submodule(first).weight.abs().flatten(1).amax(1)
        w2 = out.get_submodule(second).weight.abs()
        r2 = w2.flatten(1).amax(1) if second == "dw" else w2.transpose(0, 1).flatten(1).amax(1)
        assert torch.allclose(r1, r2, rtol=1e-3)


STEPS = {"int8": [PER_TENSOR], "cle+int8": [CrossLayerEqualization(), PER_TENSOR],
         "int8+bc": [PER_TENSOR, BiasCorrection()],
         "cle+int8+bc": [CrossLayerEqualization(), PER_TENSOR, BiasCorrection()]}


@pytest.fixture(scope="module")
def mobile(one_thread_here):
    """The planted model, its task, its float output on TEST_X, and the model after each of STEPS."""
    model = _mobile()
    task = _task(model)
    with torch.no_grad():
        reference = model(TEST_X)
    return model, task, reference, {name: sk.apply(model, steps, task) for name, steps in STEPS.items()}


def test_cle_improves_per_tensor_int8(mobile):
    model, task, reference, results = mobile
    cle = sk.apply(model, CrossLayerEqualization(), task)
    # measured: depthwise 42.1 -> 47.3 dB, pointwise 39.8 -> 46.4 dB
    assert _weight_sqnr(cle.dw.weight) >= _weight_sqnr(folded_layer(model.dw, model.bn1).weight) + 4.0
    assert _weight_sqnr(cle.pw.weight) >= _weight_sqnr(model.pw.weight) + 4.0
    with torch.no_grad():
        plain, equalized = (sqnr_db(reference, results[k](TEST_X)) for k in ("int8", "cle+int8"))
    assert equalized >= plain + 20.0  # measured 14.9 -> 48.1 dB


# quantized -> corrected, and the least factor by which bias correction shrinks the output's mean error per channel
BC_CASES = {"int8": ("int8", "int8+bc", 5.0), "cle+int8": ("cle+int8", "cle+int8+bc", 3.0)}


@pytest.mark.parametrize("case", BC_CASES)
def test_bias_correction_removes_the_mean_error(case, mobile):
    _, _, reference, results = mobile
    before, after, factor = BC_CASES[case]
    quantized, corrected = results[before], results[after]
    record = last_record(corrected, BiasCorrectionRecord)
    assert record.mode == "empirical" and sorted(record.corrected) == ["conv0", "dw", "fc", "pw"]
    assert _error_bias(corrected, reference) * factor <= _error_bias(quantized, reference)  # measured 14x, 4.8x
    with torch.no_grad():
        assert sqnr_db(reference, corrected(TEST_X)) >= sqnr_db(reference, quantized(TEST_X))


def test_composed_recipe_replays_saves_and_runs_on_onnxruntime(mobile, tmp_path):
    model, task, reference, results = mobile
    steps = STEPS["cle+int8+bc"]
    applied, uncorrected = results["cle+int8+bc"], results["cle+int8"]
    replayed = Recipe.from_yaml(Recipe.from_steps([s.to_dict() for s in steps], task=task.name).to_yaml()).replay(task)
    loaded = sk.load(sk.save(applied, tmp_path / "m", recipe=[s.to_dict() for s in steps]), model=_mobile())
    with torch.no_grad():
        out = applied(TEST_X)
        assert torch.equal(replayed(TEST_X), out)
        assert torch.equal(loaded(TEST_X), out)
        torch_shift = (out - uncorrected(TEST_X)).mean(0)  # (10,) what the corrected biases move
    ort = sk.runtime.build(applied, "onnxruntime", task.example)
    ort_before = sk.runtime.build(uncorrected, "onnxruntime", task.example)
    ort_shift = (torch.as_tensor(ort(TEST_X)) - torch.as_tensor(ort_before(TEST_X))).mean(0)  # (10,)
    assert float((ort_shift - torch_shift).abs().max()) <= 0.2 * float(torch_shift.abs().max())


def test_analytic_bias_correction_uses_the_batchnorm_before_the_layer():
    model = _mobile(nn.ReLU)
    task = _task(model, calib=False)
    weights_only = Int8(granularity="per_tensor", activations="dynamic", backend="torch")
    corrected = sk.apply(model, [weights_only, BiasCorrection()], task)
    record = last_record(corrected, BiasCorrectionRecord)
    assert record.mode == "analytic" and sorted(record.corrected) == ["dw", "pw"]
    why = "no calibration data and no BatchNorm (-> ReLU) right before it to estimate E[x]"
    assert record.skipped == {"conv0": why, "fc": why}
    with torch.no_grad():
        reference = model(TEST_X)
    quantized = sk.apply(model, weights_only, task)
    assert _error_bias(corrected, reference) * 1.5 <= _error_bias(quantized, reference)  # measured 0.077 -> 0.036
    with torch.no_grad():
        assert sqnr_db(reference, corrected(TEST_X)) >= sqnr_db(reference, quantized(TEST_X))  # 8.4 -> 14.5 dB


class NoPairs(nn.Module):
    """Nothing equalizable: a sigmoid, a residual add, a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8 * 64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 4)
        h = torch.sigmoid(self.a(x))  # (B, 8, 8, 8)
        h = h + self.b(h)
        return self.c(h.flatten(1))


def test_model_without_pairs_is_unchanged_and_every_layer_listed():
    model = NoPairs().eval()
    out = sk.apply(model, CrossLayerEqualization(), _task(model))
    record = last_record(out, EqualizationRecord)
    assert record.pairs == [] and record.skipped == {
        "a": "'sigmoid' follows it: not a channel-wise positively homogeneous op",
        "b": "an add (residual) follows it: not a channel-wise positively homogeneous op",
        "c": "its output is the model's output"}
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in model.state_dict().items())


class SharedConv(nn.Module):
    """One conv applied twice: rescaling it for one use would break the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 8, 8) -> (B, 8, 8, 8)
        return self.b(torch.relu(self.b(torch.relu(self.a(x)))))


def test_shared_layer_is_not_equalized():
    model = SharedConv().eval()
    out = sk.apply(model, CrossLayerEqualization(), _task(model))
    record = last_record(out, EqualizationRecord)
    assert record.pairs == [] and record.skipped == {
        "a": "the next layer 'b' is called more than once in forward (shared weights)",
        "b": "called more than once in forward (shared weights): rescaling it would change another use"}
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make, message", [
    (lambda: CrossLayerEqualization(iterations=0), "iterations=0 is not a positive integer"),
    (lambda: BiasCorrection(mode="exact"), "BiasCorrection mode='exact' is not known"),
])
def test_bad_options(make, message):
    with pytest.raises(SlimkitError, match=message):
        make()


def test_bias_correction_bad_inputs():
    model = _mobile()
    with pytest.raises(SlimkitError, match="found no int8 QuantConv2d/QuantLinear layer"):
        sk.apply(model, BiasCorrection(), _task(model))
    with pytest.raises(SlimkitError, match=r"mode='empirical'\) needs calibration data"):
        sk.apply(model, [Int8(granularity="per_tensor"), BiasCorrection(mode="empirical")],
                 _task(model, calib=False))
    other = _mobile()  # a task whose model is not quite the one quantized: pw's float weights differ
    with torch.no_grad():
        other.pw.weight.mul_(1.5)
    corrected = sk.apply(sk.apply(model, PER_TENSOR, _task(model)), BiasCorrection(), _task(other))
    record = last_record(corrected, BiasCorrectionRecord)
    assert sorted(record.corrected) == ["conv0", "dw", "fc"]
    assert record.skipped == {"pw": "the float weights in task.model do not round to the stored integers"}
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    with pytest.raises(SlimkitError, match="cannot find the float weights the quantizer rounded"):
        sk.apply(sk.apply(model, PER_TENSOR, _task(model)), BiasCorrection(), _task(other))
