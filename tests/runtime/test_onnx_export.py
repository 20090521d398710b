"""ONNX export: dynamic axes, atomic writes, one-line errors, module -> node mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from slimkit.core.errors import SlimkitError  # noqa: E402
from slimkit.runtime.onnx_export import export_onnx, module_nodes, module_of  # noqa: E402


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, 4, 4, 4)
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),        # (B, 128)
                         nn.Linear(128, 10)).eval()


class TinyEncoder(nn.Module):
    """A randomly initialised 2-layer BERT + masked mean pooling: (B, T), (B, T) -> (B, 32)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)
        self.bert = BertModel(cfg, add_pooling_layer=False).eval()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                      token_type_ids=torch.zeros_like(input_ids))[0]  # (B, T, C)
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def tokens(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded sequence
    return ids, mask


def run(path, *inputs: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {i.name: x.numpy() for i, x in zip(s.get_inputs(), inputs)})[0]


def test_mlp_export_has_dynamic_batch_and_matches_torch(tmp_path):
    model = tiny_mlp()
    path = export_onnx(model, (torch.randn(2, 16),), tmp_path / "mlp.onnx")
    x = torch.randn(7, 16)  # another batch size than the example's
    np.testing.assert_allclose(run(path, x), model(x).detach().numpy(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["mlp.onnx"]  # no temp file left behind
    assert model.training is False


def test_sequential_modules_map_to_their_nodes(tmp_path):
    m = onnx.load(export_onnx(tiny_cnn(), (torch.randn(1, 1, 8, 8),), tmp_path / "cnn.onnx"))
    nodes = module_nodes(m)
    assert {k: [n.op_type for n in v] for k, v in nodes.items()} == {"0": ["Conv"], "3": ["Conv"], "6": ["Gemm"]}
    init = {t.name: t for t in m.graph.initializer}
    gemm = nodes["6"][0]
    assert list(init[gemm.input[1]].dims) == [10, 128]  # (N, K) with transB=1
    assert [a.i for a in gemm.attribute if a.name == "transB"] == [1]


def test_bert_linears_map_to_matmuls_with_transposed_weights(tmp_path):
    model = TinyEncoder().eval()
    ids, mask = tokens(2, 12)
    path = export_onnx(model, (ids, mask), tmp_path / "bert.onnx")
    m = onnx.load(path)
    nodes = module_nodes(m)
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    assert set(nodes) == set(linears) and len(linears) == 12
    init = {t.name: t for t in m.graph.initializer}
    for name, mod in linears.items():
        (node,) = nodes[name]
        assert node.op_type == "MatMul"
        w = onnx.numpy_helper.to_array(init[node.input[1]])
        np.testing.assert_array_equal(w, mod.weight.detach().numpy().T)  # (K, N)
    assert "bert.encoder.layer.0.attention.self" not in nodes  # Q @ K^T has no weight: not a Linear
    # batch and sequence are dynamic, and padding is handled as in torch
    ids2, mask2 = tokens(3, 20, seed=1)
    np.testing.assert_allclose(run(path, ids2, mask2), model(ids2, mask2).detach().numpy(), atol=1e-4)


def test_export_restores_attention_implementation(tmp_path):
    model = TinyEncoder().eval()
    before = model.bert.config._attn_implementation
    export_onnx(model, tokens(2, 8), tmp_path / "bert.onnx")
    assert model.bert.config._attn_implementation == before


def test_module_of_parses_scoped_node_names():
    assert module_of("/bert/encoder/layer.0/attention/self/query/MatMul") == "bert.encoder.layer.0.attention.self.query"
    assert module_of("/13/Gemm") == "13"
    assert module_of("MatMul_12") is None


@pytest.mark.parametrize("node,known,expected", [
    # a called nn.Sequential named `layer` scopes its children as layer/layer.0 (HF ResNet)
    ("/r/stages.0/layers.0/layer/layer.1/convolution/Conv", {"r.stages.0.layers.0.layer.1.convolution"},
     "r.stages.0.layers.0.layer.1.convolution"),
    ("/r/layer/layer.1/Conv", {"r.layer.layer.1"}, "r.layer.layer.1"),  # a real doubled name stays as it is
    ("/r/layer/layer.1/Conv", None, "r.layer.layer.1"),                  # nothing known: the scopes as written
    # a child the forward takes out of an nn.ModuleDict is scoped without the dict (QuantRecurrent's gates)
    ("/cell/ih/Gemm", {"cell.gates.ih", "cell.gates.hh"}, "cell.gates.ih"),
    # a module's second call (an LSTMCell stepped in Python) is scoped ih_1
    ("/cell/hh_7/Gemm", {"cell.gates.ih", "cell.gates.hh"}, "cell.gates.hh"),
    ("/conv_1/Conv", {"conv_1", "conv"}, "conv_1"),                      # a name ending in _1 stays itself
])
def test_module_of_reads_sequential_scopes_against_the_known_modules(node, known, expected):
    assert module_of(node, known) == expected


class Eigh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


def test_unsupported_op_is_a_one_line_error_and_leaves_no_file(tmp_path):
    with pytest.raises(SlimkitError) as err:
        export_onnx(Eigh(), (torch.randn(2, 4, 4),), tmp_path / "bad.onnx")
    msg = str(err.value)
    assert "\n" not in msg and "aten::linalg_eigh" in msg and msg.startswith("ONNX export of Eigh failed")
    assert list(tmp_path.iterdir()) == []


def test_bad_example_is_a_slimkit_error(tmp_path):
    with pytest.raises(SlimkitError, match="fails on the example inputs"):
        export_onnx(tiny_mlp(), (torch.randn(2, 5),), tmp_path / "mlp.onnx")
