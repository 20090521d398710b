"""int8 embedding tables: per-row quantization error, bytes, bit-identical reload, same numbers on ONNX Runtime."""

import dataclasses

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.errors import SlimkitError
from slimkit.io import artifact_bytes
from slimkit.quantize import Int8, QuantEmbedding, WeightOnly
from tests.conftest import sqnr_db
from tests.runtime.test_onnx_export import TinyEncoder, tokens


def test_rows_keep_sqnr_and_lookups_match_the_dequantized_table():
    torch.manual_seed(0)
    emb = nn.Embedding(500, 64, padding_idx=0)
    q = QuantEmbedding.from_float(emb)
    assert q.qweight.dtype == torch.int8 and q.weight_scale.shape == (500,)
    assert sqnr_db(emb.weight.detach(), q.dequantized_weight()) >= 38.0  # Gaussian rows, 8 bits per row
    ids = torch.randint(0, 500, (3, 7))
    assert torch.equal(q(ids), q.dequantized_weight()[ids])  # (3, 7, 64) gathered then dequantized
    assert torch.equal(q.to_float()(ids), q(ids))


def test_bad_embedding_is_a_slimkit_error():
    with pytest.raises(SlimkitError):
        QuantEmbedding.from_float(nn.Linear(3, 3))
    with pytest.raises(SlimkitError):
        QuantEmbedding.from_float(nn.Embedding(4, 3, max_norm=1.0))


@pytest.mark.parametrize("config", [Int8(), WeightOnly(bits=8)], ids=["int8", "w8"])
def test_transformer_tables_are_int8_bytes_drop_and_reload_is_identical(config, tmp_path):
    model = TinyEncoder().eval()
    q = sk.apply(model, config)
    tables = [n for n, m in q.named_modules() if isinstance(m, QuantEmbedding)]
    assert len(tables) == 3 and q.slimkit_quant["embeddings"] == tables
    float_tables = sk.apply(model, dataclasses.replace(config, embeddings=False))
    int8 = artifact_bytes(sk.save(q, tmp_path / "q"))
    saved = artifact_bytes(sk.save(float_tables, tmp_path / "f")) - int8
    elements = sum(m.qweight.numel() for m in q.modules() if isinstance(m, QuantEmbedding))
    assert saved >= 0.6 * 4 * elements  # 3 of 4 bytes go, less row scales and specs (MiniLM: 3.9x in all)
    back = sk.load(tmp_path / "q", model=TinyEncoder())
    ids, mask = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(back(ids, mask), q(ids, mask))
        cos = torch.nn.functional.cosine_similarity(model(ids, mask), q(ids, mask), dim=-1)
    assert float(cos.min()) >= 0.99


def test_embeddings_false_and_exclude_keep_tables_float():
    model = TinyEncoder().eval()
    assert sk.apply(model, Int8(embeddings=False)).slimkit_quant["embeddings"] == []
    kept = sk.apply(model, Int8(exclude=("bert.embeddings.word_embeddings",)))
    assert isinstance(kept.bert.embeddings.word_embeddings, nn.Embedding)
    assert Int8.from_dict(Int8(embeddings=False).to_dict()) == Int8(embeddings=False)


def test_onnx_graph_gathers_int8_rows_and_matches_torch_bit_for_bit(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from slimkit.runtime import build

    q = sk.apply(TinyEncoder().eval(), Int8())
    m = build(q, "onnxruntime", tokens(2, 12), threads=1)
    init = {t.name: t for t in onnx.load(m.path).graph.initializer}
    word = next(t for n, t in init.items() if "word_embeddings" in n and len(t.dims) == 2)
    assert word.data_type == onnx.TensorProto.INT8 and list(word.dims) == [100, 32]
    ids = tokens(3, 9, seed=1)[0]
    table = q.bert.embeddings.word_embeddings
    ort_rows = build(nn.Sequential(table), "onnxruntime", (ids,), threads=1)(ids)
    assert torch.equal(ort_rows, table(ids))
