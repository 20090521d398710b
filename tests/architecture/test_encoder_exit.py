"""Early exits on the MiniLM polarity classifier: exact at the extremes, padding-safe routing, real accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.architecture import EncoderClassifier, attach_exits, encoder_classifier, exit_features, fit_heads
from slimkit.architecture.encoder_exit import _logistic_head
from slimkit.core.errors import SlimkitError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def polarity():
    """(encoder, ids (200, T), mask, labels, classifier): the task's 200 polarity sentences."""
    from slimkit.zoo import minilm

    encoder = minilm.build_minilm()
    data = minilm.build_eval()
    rows, labels = data.polarity
    ids, mask = minilm.tokenize([data.texts[i] for i in rows], minilm.EVAL_MAX_LENGTH)
    with torch.inference_mode():
        emb = encoder(ids, mask)  # (200, 384)
    return encoder, ids, mask, labels, encoder_classifier(encoder, emb.numpy(), labels)


def test_closed_exits_are_the_classifier_and_open_ones_always_fire(polarity):
    _, ids, mask, _, clf = polarity
    ee = attach_exits(clf, (ids[:4], mask[:4]), [1, 3])
    batch = (ids[:48], mask[:48])  # (48, T): padded to the longest of the whole set
    with torch.inference_mode():
        full = clf(*batch)
        assert (ee(*batch) - full).abs().max().item() <= 1e-5
        assert (ee.last_exits == 2).all()
        ee.set_thresholds([0.0, 0.0])
        first = ee.heads[0](ee.blocks[0](batch))
        assert torch.equal(ee(*batch), first)
        assert (ee.last_exits == 0).all()


def test_routing_in_a_padded_batch_equals_one_sentence_at_a_time(polarity):
    _, ids, mask, labels, clf = polarity
    ee = attach_exits(clf, (ids[:4], mask[:4]), [2])
    features = exit_features(ee, [(ids, mask)])
    fit_heads(ee, features, labels)
    with torch.no_grad():
        conf = ee.heads[0].linear(features[0]).softmax(-1).amax(-1)  # (200,)
    ee.set_thresholds([float(conf.median())])  # about half leave early
    lengths = mask.sum(1)
    with torch.inference_mode():
        batched = ee(ids[:64], mask[:64])
        batched_exits = ee.last_exits.clone()
        singles = []
        for i in range(64):  # each sentence alone, without padding
            singles.append(ee(ids[i:i + 1, :int(lengths[i])], mask[i:i + 1, :int(lengths[i])]))
    assert 10 <= int((batched_exits == 0).sum()) <= 54
    assert (batched - torch.cat(singles)).abs().max().item() <= 1e-4


def test_logistic_head_is_the_regression_and_mid_layer_exit_reads_polarity(polarity):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    _, ids, mask, labels, clf = polarity
    ee = attach_exits(clf, (ids[:4], mask[:4]), [2])
    features = exit_features(ee, [(ids, mask)])  # 2 x (200, 384)
    x = features[0].double().numpy()
    reference = LogisticRegression(C=1.0, max_iter=2000).fit(x, labels).predict_proba(x)
    ours = _logistic_head(x, labels, 1.0)(features[0]).softmax(-1).detach().numpy()
    assert np.abs(ours - reference).max() <= 1e-5
    # the final features score like the task's polarity metric; layer 3 of 6 reads polarity at least as well
    cv = [cross_val_score(LogisticRegression(C=1.0, max_iter=2000), f.double().numpy(), labels,
                          cv=StratifiedKFold(5)).mean() for f in features]
    assert cv[1] == pytest.approx(0.730, abs=0.011)
    assert cv[0] >= 0.72


def test_saved_early_exit_reloads_with_its_thresholds(polarity, tmp_path):
    _, ids, mask, labels, clf = polarity
    ee = attach_exits(clf, (ids[:4], mask[:4]), [2])
    fit, held = torch.arange(0, 200, 2), torch.arange(1, 200, 6)  # both classes in each (100 neg, then 100 pos)
    fit_heads(ee, exit_features(ee, [(ids[fit], mask[fit])]), labels[fit.numpy()])
    ee.set_thresholds([0.6])
    sk.save(ee, tmp_path / "exits")
    back = sk.load(tmp_path / "exits")
    assert back.thresholds.tolist() == pytest.approx([0.6])
    with torch.inference_mode():
        assert torch.equal(back(ids[held], mask[held]), ee(ids[held], mask[held]))
        assert torch.equal(back.last_exits, ee.last_exits)
        assert 0 < int((ee.last_exits == 0).sum()) < len(held)  # both exits are used


def test_bad_exit_requests_are_refused(polarity):
    encoder, ids, mask, labels, clf = polarity
    with pytest.raises(SlimkitError, match="do not split a 6-layer encoder"):
        attach_exits(clf, (ids[:4], mask[:4]), [5])
    with pytest.raises(SlimkitError, match="no list of transformer encoder blocks"):
        attach_exits(EncoderClassifier(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2)), (ids[:4], mask[:4]), [0])
    with pytest.raises(SlimkitError, match="single class"):
        _logistic_head(np.zeros((4, 3)), np.zeros(4, dtype=np.int64), 1.0)


def test_config_trains_encoder_exits_with_the_finetuning_loop(polarity):
    """``EarlyExitConfig`` on an encoder classifier: heads trained by ``finetune`` with the exit loss,
    thresholds calibrated on held-out batches; the trained exit reads polarity on unseen sentences."""
    import torch.nn.functional as F

    from slimkit.architecture import EarlyExitConfig
    from slimkit.core.task import Task, accuracy

    encoder, ids, mask, labels, _ = polarity
    y = torch.from_numpy(labels)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    fit, held = order[:120], order[120:]
    with torch.inference_mode():
        clf = encoder_classifier(encoder, encoder(ids[fit], mask[fit]).numpy(), labels[fit.numpy()])  # never sees held
    train = [((ids[b], mask[b]), y[b]) for b in fit.split(12)]  # 10 batches, both classes mixed
    task = Task(name="polarity", model=clf, example=(ids[:4], mask[:4]), metric=accuracy,
                eval=[((ids[held], mask[held]), y[held])], train=train, loss=F.cross_entropy)
    ee = sk.apply(clf, EarlyExitConfig(after=(2,), steps=80, lr=1e-2, distill=0.0, holdout=2, max_drop=0.05), task)
    assert not any(p.requires_grad for p in ee.blocks.parameters())  # the encoder stayed frozen
    with torch.inference_mode():
        first = ee.heads[0](ee.blocks[0]((ids[held], mask[held])))  # (80, 2)
    assert (first.argmax(-1) == y[held]).float().mean().item() >= 0.62  # chance is 0.5
    routed, full = task.evaluate(ee)["score"], task.evaluate(clf)["score"]
    assert routed >= full - 0.10  # 80 unseen sentences: a 0.05 calibrated drop plus sampling noise
