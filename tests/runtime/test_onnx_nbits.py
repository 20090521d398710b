"""Weight-only, binary and ternary layers on ONNX Runtime: slimkit's own integers in the file, exact outputs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import slimkit as sk  # noqa: E402
from slimkit.quantize.extreme_modules import ExtremeConv2d, ExtremeLinear, int4_per_channel  # noqa: E402
from slimkit.quantize.modules import QuantLinear  # noqa: E402
from slimkit.runtime import build, ort_plan, resolve_backend  # noqa: E402


class Stack(nn.Module):
    """(B, T, 64) -> two Linear layers -> (B, T, 24): the MatMul form a transformer's Linear exports as."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 64),
                         nn.ReLU(), nn.Linear(64, 10)).eval()  # 2-D input: the Linear layers export as Gemm


def conv_bn_net() -> nn.Module:
    """A conv with a BatchNorm after it: the export folds the BatchNorm into the conv's weight."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(8)
    bn.running_var.uniform_(0.5, 4.0)
    bn.running_mean.normal_()
    bn.weight.data.uniform_(0.5, 2.0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 64),
                         nn.ReLU(), nn.Linear(64, 10)).eval()


NETS = {"stack": (Stack, lambda n: torch.randn(n, 5, 64)), "conv": (conv_net, lambda n: torch.randn(n, 3, 4, 4)),
        "conv-bn": (conv_bn_net, lambda n: torch.randn(n, 3, 4, 4))}
#: (config, net, Linear layers on MatMulNBits, convs as int8 + DequantizeLinear)
CASES = [
    (sk.quantize.WeightOnly(bits=4, group_size=32), "stack", 2, 0),
    (sk.quantize.WeightOnly(bits=4, group_size=64), "stack", 2, 0),
    (sk.quantize.WeightOnly(bits=8), "stack", 2, 0),
    (sk.quantize.WeightOnly(bits=4, group_size=32), "conv", 2, 1),  # the conv is int4 per channel (BitConv2d)
    (sk.quantize.WeightOnly(bits=8), "conv", 2, 1),
    (sk.quantize.WeightOnly(bits=8), "conv-bn", 2, 1),  # the folded BatchNorm's factor moves into the scales
]


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the stored integers mean: the float model with the dequantized weights (fp32 activations)."""
    with torch.inference_mode():
        return ort_plan(model)[0](x)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("config,net,nbits,convs", CASES, ids=[f"{c.bits}-{c.group_size}-{n}" for c, n, *_ in CASES])
def test_weight_only_runs_slimkits_integers_on_matmulnbits(config, net, nbits, convs):
    factory, inputs = NETS[net]
    model = config.apply_to(factory().eval(), None)
    runnable = build(model, "onnxruntime", (inputs(3),), threads=1)
    assert runnable.kernels["MatMulNBits"] == nbits and runnable.kernels["DequantizeLinear"] == convs
    x = inputs(7)  # another batch than the example's: the batch axis is dynamic
    assert _rel(runnable(x), _reference(model, x)) < 1e-5  # measured 2e-7 .. 4e-7: fp32 rounding only
    # torch's weight-only kernels take bf16 activations: the same weights, further from the reference
    with torch.inference_mode():
        assert _rel(model(x), _reference(model, x)) < 2e-2
    assert all(m in runnable.storage for m in runnable.layer_kernels)
    assert all("MatMulNBits" in runnable.storage[m] for m, op in runnable.layer_kernels.items() if op == "MatMulNBits")


def test_the_file_holds_slimkits_packed_bytes():
    model = sk.quantize.WeightOnly(bits=4, group_size=32).apply_to(Stack().eval(), None)
    runnable = build(model, "onnxruntime", (torch.randn(2, 5, 64),), threads=1)
    graph = onnx.load(str(runnable.path)).graph
    init = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    node = next(n for n in graph.node if n.op_type == "MatMulNBits" and "up" in n.name)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (64, 128, 4, 32, 0)
    blob = init[node.input[1]]
    assert blob.shape == (128, 2, 16) and np.array_equal(blob.reshape(128, 32), model.up.qweight.numpy())
    assert np.array_equal(init[node.input[2]], model.up.weight_scale.numpy())


def test_an_int8_row_that_no_block_divides_is_padded_with_zero_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    q = sk.quantize.WeightOnly(bits=8).apply_to(model, None)
    runnable = build(q, "onnxruntime", (torch.randn(2, 20),), threads=1)
    x = torch.randn(9, 20)
    assert runnable.kernels["MatMulNBits"] == 2 and _rel(runnable(x), _reference(q, x)) < 1e-5


def test_a_group_that_is_no_power_of_two_stays_float_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 16)).eval()
    model[0] = QuantLinear.from_float(model[0], bits=4, group_size=24)
    runnable = build(model, "onnxruntime", (torch.randn(2, 48),), threads=1)
    assert "powers of two" in runnable.skipped["0"] and runnable.kernels["MatMulNBits"] == 0
    x = torch.randn(4, 48)
    assert _rel(runnable(x), _reference(model, x)) < 1e-5  # the dequantized float weight, same values


def test_binary_and_ternary_export_unpacked_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    model[0] = ExtremeConv2d.from_float(model[0], "ternary").convert()
    model[2] = int4_per_channel(model[2])  # 4-bit codes: int8 + DequantizeLinear
    model[4] = ExtremeLinear.from_float(model[4], "binary").convert()
    model[6] = QuantLinear.from_float(model[6], bits=8)
    x = torch.randn(2, 3, 4, 4)
    runnable = build(model, "onnxruntime", (x,), threads=1)
    assert "2-bit weights" in runnable.skipped["0"] and "1-bit weights" in runnable.skipped["4"]
    assert "float32" in runnable.skipped["0"] and "DequantizeLinear" in runnable.storage["2"]
    assert runnable.layer_kernels["6"] == "MatMulNBits"
    y = torch.randn(5, 3, 4, 4)
    assert _rel(runnable(y), _reference(model, y)) < 1e-5
    with torch.inference_mode():  # the bit-packed layers themselves are exact: only the int8 Linear's bf16 differs
        assert _rel(runnable(y), model(y)) < 1e-2


def test_auto_runs_weight_only_on_onnx_runtime_and_the_original_is_untouched():
    model = sk.quantize.WeightOnly(bits=4, group_size=32).apply_to(Stack().eval(), None)
    before = copy.deepcopy(model.state_dict())
    assert resolve_backend(model) == "onnxruntime"
    runnable = build(model, "auto", (torch.randn(2, 5, 64),), threads=1)
    assert runnable.mode == "none" and runnable.kernels["MatMulNBits"] == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow  # transformers import + two exports: ~10-20 s
def test_a_transformer_encoder_runs_every_linear_on_matmulnbits():
    from tests.runtime.test_onnx_export import TinyEncoder, tokens

    model = sk.quantize.WeightOnly(bits=4, group_size=32, embeddings=False).apply_to(TinyEncoder().eval(), None)
    runnable = build(model, "onnxruntime", tokens(2, 6), threads=1)
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert linears == 12 and runnable.kernels["MatMulNBits"] == linears  # q, k, v, o, up, down x 2 layers
    ids, mask = tokens(3, 9, seed=1)  # other batch and sequence lengths: both axes are dynamic
    with torch.inference_mode():
        want = ort_plan(model)[0](ids, mask)
    assert _rel(runnable(ids, mask), want) < 1e-5


@pytest.mark.slow  # a whole command run: baseline and candidate measured, ~10 s
def test_a_weight_only_command_run_keeps_model_onnx(digits_task, tmp_path, one_thread):
    from slimkit.pipeline.recipe import Recipe
    from slimkit.pipeline.run import run_recipe

    recipe = Recipe.from_steps([sk.quantize.WeightOnly(bits=4, group_size=32).to_dict()], task="digits")
    result = run_recipe(digits_task, recipe, tmp_path, title="t", threads=1)
    final = result.candidates[-1]
    assert final.backend == "onnxruntime" and (tmp_path / "model.onnx").is_file()
    assert final.runnable.kernels["MatMulNBits"] == 2  # the two Linear layers; the convs int8 + DequantizeLinear
    assert abs(final.metric["score"] - result.candidates[0].metric["score"]) <= 0.05
