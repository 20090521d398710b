"""ONNX Runtime backend: fp32 parity, slimkit's integers in ORT, integer kernels, skips, masks, threads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from slimkit.core.errors import SlimkitError  # noqa: E402
from slimkit.formats.pack import quantize_weight_int8  # noqa: E402
from slimkit.runtime.onnx_export import module_nodes  # noqa: E402
from slimkit.runtime.ort import OrtQuantPlan, build_ort  # noqa: E402
from tests.conftest import sqnr_db  # noqa: E402
from tests.runtime.test_onnx_export import TinyEncoder, tiny_cnn, tiny_mlp, tokens  # noqa: E402

MLP = (tiny_mlp, lambda n: (torch.randn(n, 16),), ["0", "2"])
CNN = (tiny_cnn, lambda n: (torch.randn(n, 1, 8, 8),), ["0", "3", "6"])


def input_ranges(model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, ...]]) -> dict:
    """(min, max) of each module's input over ``batches``: what slimkit's calibration hands over."""
    seen: dict[str, list[tuple[float, float]]] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append((float(a[0].min()), float(a[0].max())))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(*b)
    for h in hooks:
        h.remove()
    return {n: (min(lo for lo, _ in v), max(hi for _, hi in v)) for n, v in seen.items()}


def int8_weight(model: nn.Module, name: str, per_channel: bool) -> np.ndarray:
    return quantize_weight_int8(model.get_submodule(name).weight.detach(), per_channel)[0].numpy()


def initializers(path) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def as_int8(q: np.ndarray) -> np.ndarray:
    """The integers a stored weight means: uint8 weights are int8 + 127 (zero point 127) where int8 kernels saturate."""
    return q.astype(np.int16) - 127 if q.dtype == np.uint8 else q.astype(np.int16)


@pytest.mark.parametrize("case", [MLP, CNN], ids=["mlp", "cnn"])
def test_fp32_matches_torch_and_threads_are_pinned(case, tmp_path):
    build, data, _ = case
    model = build()
    m = build_ort(model, data(2), threads=1, workdir=tmp_path)
    x = data(9)
    assert (m(*x) - model(*x).detach()).abs().max() < 1e-4
    opts = m.session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads, m.threads) == (1, 1, 1)
    assert opts.execution_mode.name == "ORT_SEQUENTIAL"
    assert m.path == tmp_path / "model.onnx" and m.file_bytes == m.path.stat().st_size
    assert m.skipped == {} and not any("Quant" in k for k in m.kernels)


@pytest.mark.parametrize("per_channel", [True, False])
def test_dynamic_int8_uses_slimkits_integers(per_channel, tmp_path):
    model = tiny_mlp()
    m = build_ort(model, (torch.randn(2, 16),), plan=OrtQuantPlan("dynamic", ["0", "2"], per_channel=per_channel),
                  workdir=tmp_path)
    x = torch.randn(64, 16)
    assert sqnr_db(model(x).detach(), m(x)) >= 25.0
    assert m.kernels["DynamicQuantizeMatMul"] + m.kernels["MatMulIntegerToFloat"] == 2 and m.kernels["Gemm"] == 0
    init = initializers(m.path)
    for name in ("0", "2"):
        ort_q = as_int8(init[f"{name}.weight_kn_quantized"]).T  # ORT keeps (K, N)
        np.testing.assert_array_equal(ort_q, int8_weight(model, name, per_channel))


def test_dynamic_conv_per_channel_is_skipped_not_mismatched(tmp_path):
    model = tiny_cnn()
    m = build_ort(model, (torch.randn(2, 1, 8, 8),), plan=OrtQuantPlan("dynamic", ["0", "3", "6"]), workdir=tmp_path)
    assert set(m.skipped) == {"0", "3"} and "per-tensor" in m.skipped["0"]
    x = torch.randn(32, 1, 8, 8)
    assert sqnr_db(model(x).detach(), m(x)) >= 25.0


@pytest.mark.parametrize("case", [MLP, CNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["int8-sym", "uint8-asym"])
def test_static_int8_runs_integer_kernels_with_slimkits_integers(case, symmetric, tmp_path):
    build, data, names = case
    model = build()
    torch.manual_seed(1)
    plan = OrtQuantPlan("static", names, act_ranges=input_ranges(model, names, [data(64)]),
                        symmetric_activations=symmetric)
    m = build_ort(model, data(2), plan=plan, workdir=tmp_path)
    x = data(64)
    assert sqnr_db(model(*x).detach(), m(*x)) >= 25.0
    assert m.skipped == {}
    kernels = {"Conv", "Gemm", "FusedConv", "FusedGemm", "MatMul"} & set(m.kernels)
    assert not kernels, f"float compute left: {m.kernels}"
    assert m.kernels["QGemm"] == 2 if case is MLP else m.kernels["QLinearConv"] + m.kernels["QGemm"] == 3
    init = initializers(m.path)
    for name, node in ((n, module_nodes(onnx.load(tmp_path / "float.onnx"))[n][0]) for n in names):
        q = as_int8(init[f"{node.input[1]}_int8_{node.name}"])
        np.testing.assert_array_equal(q, int8_weight(model, name, True))


def test_static_qdq_graph_is_exactly_slimkits_fake_quant(tmp_path):
    """The QDQ graph run literally equals fake-quant with slimkit's weights and activation grid."""
    model = tiny_mlp()
    ranges = {"0": (-3.0, 2.5), "2": (0.0, 1.5)}
    m = build_ort(model, (torch.randn(2, 16),), plan=OrtQuantPlan("static", ["0", "2"], act_ranges=ranges),
                  workdir=tmp_path, optimize=False)

    def fq(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:  # int8 symmetric, zero 0
        s = torch.tensor(max(-lo, hi) / 127, dtype=torch.float32)
        return torch.clamp(torch.round(x / s), -128, 127) * s

    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = model.get_submodule(name)
        q, s = quantize_weight_int8(layer.weight.detach())
        return x @ (q.float() * s[:, None]).T + layer.bias.detach()

    x = torch.randn(32, 16) * 2
    ref = lin("2", fq(torch.relu(lin("0", fq(x, *ranges["0"]))), *ranges["2"]))
    assert (m(x) - ref).abs().max() < 1e-4  # int32 bias rounding is the only difference


def test_non_finite_range_is_skipped_and_model_still_runs(tmp_path, caplog):
    model = tiny_mlp()
    plan = OrtQuantPlan("static", ["0", "2", "missing"], act_ranges={"0": (-4.0, math.inf), "2": (0.0, 2.0)})
    with caplog.at_level("WARNING", logger="slimkit.runtime.ort"):
        m = build_ort(model, (torch.randn(2, 16),), plan=plan, workdir=tmp_path)
    assert set(m.skipped) == {"0", "missing"}
    assert "not finite" in m.skipped["0"] and "\n" not in m.skipped["0"] and "no MatMul" in m.skipped["missing"]
    assert "0 stays float" in caplog.text
    assert m.kernels["Gemm"] + m.kernels["FusedGemm"] == 1 and m.kernels["QGemm"] == 1
    x = torch.randn(32, 16)
    assert sqnr_db(model(x).detach(), m(x)) >= 30.0


def test_transformer_static_quantizes_only_planned_linears_never_the_mask(tmp_path):
    model = TinyEncoder().eval()
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    calib = [tokens(4, 16, seed=s) for s in range(3)]
    plan = OrtQuantPlan("static", linears, act_ranges=input_ranges(model, linears, calib))
    m = build_ort(model, tokens(2, 12), plan=plan, workdir=tmp_path)
    assert m.skipped == {}
    assert m.kernels["MatMulIntegerToFloat"] == len(linears)  # every Linear on an integer kernel
    graph = onnx.load(m.path).graph
    planned_inputs = {n.input[0] for nodes in module_nodes(onnx.load(tmp_path / "float.onnx")).values() for n in nodes}
    q_inputs = [n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"]
    # the saved graph is ORT's optimized one: it moves an output Q ahead of Transpose/Reshape ("_pre_q")
    assert len(q_inputs) == len(linears)
    assert {q for q in q_inputs if not q.endswith("_pre_q")} <= planned_inputs
    mask_only = _reach(graph, "attention_mask") - _reach(graph, "input_ids")  # the additive-mask subgraph
    assert mask_only and not mask_only & set(q_inputs)
    ids, mask = tokens(3, 20, seed=7)
    cos = torch.nn.functional.cosine_similarity(model(ids, mask).detach(), m(ids, mask), dim=-1)
    assert float(cos.min()) >= 0.99


def _reach(graph, source: str) -> set[str]:
    """Tensors computed from ``source`` (forward closure over the graph)."""
    reached = {source}
    for node in graph.node:  # nodes are in topological order
        if reached & set(node.input):
            reached |= set(node.output)
    return reached


def test_mnist_static_int8_keeps_accuracy_on_integer_kernels(mnist_task, tmp_path):
    model = mnist_task.model
    names = ["0", "4", "8", "13", "15"]
    plan = OrtQuantPlan("static", names, act_ranges=input_ranges(model, names, mnist_task.calib))
    m = build_ort(model, mnist_task.example, plan=plan, threads=2, workdir=tmp_path)
    assert m.kernels["QLinearConv"] == 3 and m.kernels["QGemm"] == 2
    float_acc = mnist_task.evaluate()["score"]
    assert mnist_task.evaluate(m)["score"] >= float_acc - 0.01
    assert m.file_bytes < 0.35 * (tmp_path / "float.onnx").stat().st_size


def test_bad_plan_and_bad_call_are_slimkit_errors(tmp_path):
    with pytest.raises(SlimkitError, match="mode"):
        OrtQuantPlan("weight-only", ["0"])
    m = build_ort(tiny_mlp(), (torch.randn(2, 16),), workdir=tmp_path)
    with pytest.raises(SlimkitError, match="takes 1 inputs"):
        m(torch.randn(2, 16), torch.randn(2, 16))


def test_linear_bias_is_folded_into_the_integer_matmul_with_identical_outputs(tmp_path, monkeypatch):
    import slimkit.runtime.ort as ort_backend

    model = TinyEncoder().eval()
    linears = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    plan = OrtQuantPlan("static", linears, act_ranges=input_ranges(model, linears, [tokens(4, 16)]))
    folded = build_ort(model, tokens(2, 12), plan=plan, workdir=tmp_path / "a")
    graph = onnx.load(folded.path).graph
    fused = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == len(linears) and sum(len(n.input) == 7 and n.input[6] != "" for n in fused) >= 8
    monkeypatch.setattr(ort_backend, "fold_bias", lambda path: 0)
    plain = build_ort(model, tokens(2, 12), plan=plan, workdir=tmp_path / "b")
    assert folded.kernels["Add"] < plain.kernels["Add"]
    ids, mask = tokens(3, 20, seed=3)
    np.testing.assert_allclose(folded(ids, mask).numpy(), plain(ids, mask).numpy(), rtol=0, atol=1e-6)


class _TwoHeads(nn.Module):
    """A detector-style model: two outputs (scores and boxes)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.scores, self.boxes = nn.Linear(8, 16), nn.Linear(16, 3), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        return self.scores(h), self.boxes(h)


def test_a_multi_output_model_returns_every_output_on_onnxruntime():
    torch.manual_seed(0)
    model, x = _TwoHeads().eval(), torch.randn(4, 8)
    run = build_ort(model, (x,))
    got = run(x)
    with torch.no_grad():
        want = model(x)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


class PReLUNet(nn.Module):
    """Face-detector convs: conv -> PReLU, conv -> ReLU -> BatchNorm (no conv output a planned layer reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.p1 = nn.Conv2d(3, 16, 3), nn.PReLU(16)
        self.c2, self.bn2 = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        self.c3, self.p3 = nn.Conv2d(32, 32, 3), nn.PReLU(32)
        self.fc = nn.Linear(32 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 16, 16)
        x = nn.functional.max_pool2d(self.p1(self.c1(x)), 2)  # (B, 16, 7, 7)
        x = self.bn2(torch.relu(self.c2(x)))                  # (B, 32, 5, 5)
        return self.fc(self.p3(self.c3(x)).flatten(1))        # (B, 10)


@pytest.mark.parametrize("out_ranges,integer", [({}, True), ({"fc": (-1.0, 1.0)}, False)])
def test_static_convs_followed_by_prelu_or_relu_batchnorm_run_integer_or_are_listed(out_ranges, integer, tmp_path):
    torch.manual_seed(0)
    model = PReLUNet().eval()
    with torch.no_grad():
        model.bn2.running_mean.uniform_(-0.5, 0.5)
        model.bn2.running_var.uniform_(0.5, 2.0)
    names = ["c1", "c2", "c3", "fc"]
    calib = [(torch.randn(16, 3, 16, 16),) for _ in range(3)]
    plan = OrtQuantPlan("static", names, act_ranges=input_ranges(model, names, calib), out_ranges=out_ranges)
    m = build_ort(model, calib[0], plan=plan, workdir=tmp_path)
    convs = {n: m.layer_kernels[n] for n in ("c1", "c2", "c3")}
    if integer:  # the conv's own output range (measured on the example) lets ORT fuse QLinearConv
        assert set(convs.values()) == {"QLinearConv"} and m.skipped == {}
    else:  # without it the convs run float between Q/DQ: each is listed with the reason
        assert "QLinearConv" not in convs.values()
        assert set(m.skipped) == {"c1", "c2", "c3"}
        assert all("float" in why for why in m.skipped.values())
    assert m.layer_kernels["fc"] == "QGemm"
    assert sqnr_db(model(*calib[1]).detach(), m(*calib[1])) >= 25.0


def test_hf_resnet_static_int8_runs_every_conv_on_an_integer_kernel(tmp_path):
    """HF ResNet: conv weights reach their Conv through an Identity, and its Sequential scopes name
    ``layer/layer.0`` for the module ``layer.0``; neither may leave a conv float."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4)).eval()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x).logits                      # (B, 4)

    model = Logits().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    calib = [(torch.randn(8, 3, 32, 32),) for _ in range(3)]
    plan = OrtQuantPlan("static", names, act_ranges=input_ranges(model, names, calib))
    m = build_ort(model, calib[0], plan=plan, workdir=tmp_path)
    assert m.skipped == {} and len(names) == 7  # 6 convs (one a strided shortcut) and the classifier
    assert {m.layer_kernels[n] for n in names} == {"QLinearConv", "QGemm"}
    with torch.no_grad():
        assert sqnr_db(model(*calib[1]), m(*calib[1])) >= 20.0
