"""Encoder NAS: members are valid slices of the model, counted by the formula, ranked on real text."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.nas.arch_search import Evaluation, best_feasible, evolve, optuna_search
from slimkit.nas.encoder import EncoderArch, EncoderSpace, block_parts, encoder_blocks, rank, subnet
from slimkit.nas.encoder_search import (
    EncoderEvaluator,
    LatencyModel,
    best_per_depth,
    held_out_error,
    mean_cosine,
    rerank,
)


class Logits(nn.Module):
    """An HF classifier that returns its logits tensor (what the evaluator compares)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).logits


def tiny(family: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers as T

    torch.manual_seed(0)
    if family == "bert":
        model = T.BertForSequenceClassification(T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=6,
                                                            num_attention_heads=8, intermediate_size=256, num_labels=16))
        x = torch.randint(0, 100, (4, 16))
    else:
        model = T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3,
                                                        num_attention_heads=4, intermediate_size=128, num_labels=16))
        x = torch.randn(4, 3, 32, 32)
    return Logits(model).eval(), (x,)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_every_member_runs_and_its_parameter_count_matches_the_formula(family):
    model, x = tiny(family)
    space = EncoderSpace.from_model(model)
    members = list(space.members())
    assert len(members) == len(space.layers) * len(space.heads) * len(space.ffns) >= 27
    ranking = rank(model, [x])
    for arch in [space.smallest(), space.largest(), *random.Random(0).sample(members, 10)]:
        member = subnet(model, arch, ranking)
        assert sum(p.numel() for p in member.parameters()) == space.param_count(arch), arch
        with torch.inference_mode():
            out = member(*x)
        assert out.shape == (4, 16) and torch.isfinite(out).all()
        parts = block_parts(encoder_blocks(member)[0])
        assert (parts.attention.module.num_attention_heads, parts.up.out_features) == (arch.heads, arch.ffn)


def test_largest_member_is_the_model_exactly():
    model, x = tiny("bert")
    space = EncoderSpace.from_model(model)
    member = subnet(model, space.largest(), rank(model, [x]))
    with torch.inference_mode():
        assert torch.equal(member(*x), model(*x))
    assert space.param_count(space.largest()) == sum(p.numel() for p in model.parameters())


def test_member_weights_are_slices_of_the_model_and_members_are_nested():
    model, x = tiny("bert")
    ranking = rank(model, [x])
    arch = EncoderArch(layers=3, heads=4, ffn=128)
    member = subnet(model, arch, ranking)
    kept = last_record(member).kept_layers
    assert kept == [1, 3, 5]
    originals = encoder_blocks(model)
    for block, i in zip(encoder_blocks(member), kept):
        p, o = block_parts(block), block_parts(originals[i])
        heads = sorted(ranking.heads[i][:4])
        ch = torch.tensor([h * 8 + j for h in heads for j in range(8)])
        units = torch.tensor(sorted(ranking.units[i][:128]))
        assert torch.equal(p.attention.qkv[0].weight, o.attention.qkv[0].weight[ch])
        assert torch.equal(p.attention.qkv[2].bias, o.attention.qkv[2].bias[ch])
        assert torch.equal(p.out.weight, o.out.weight[:, ch])
        assert torch.equal(p.up.weight, o.up.weight[units]) and torch.equal(p.down.weight, o.down.weight[:, units])
    smaller = subnet(model, EncoderArch(layers=3, heads=2, ffn=64), ranking)
    for small, big in zip(encoder_blocks(smaller), encoder_blocks(member)):  # a prefix of the same ranking
        rows = {tuple(r) for r in block_parts(big).up.weight.tolist()}
        assert block_parts(small).up.out_features == 64
        assert all(tuple(r) in rows for r in block_parts(small).up.weight.tolist())


def test_bad_input_is_refused():
    model, _ = tiny("bert")
    with pytest.raises(SlimkitError, match="does not fit inside"):
        subnet(model, EncoderArch(layers=7, heads=8, ffn=256))
    with pytest.raises(SlimkitError, match="encoder"):
        EncoderSpace.from_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(SlimkitError, match="layers, heads, ffn >= 1"):
        sk.nas.Encoder(layers=0)


def test_latency_model_recovers_an_exact_cost_and_reports_its_error():
    coef = (0.5, 0.3, 0.05, 0.002)
    evals = [Evaluation(a, 0.0, sum(c * f for c, f in zip(coef, LatencyModel.features(a))))  # type: ignore[arg-type]
             for a in (EncoderArch(l, h, f) for l in (1, 2, 4) for h in (2, 4) for f in (64, 256))]
    fitted = LatencyModel.fit(evals)
    assert fitted.coef == pytest.approx(coef, rel=1e-6)
    assert held_out_error(evals)["mean_rel_error"] < 1e-9
    with pytest.raises(SlimkitError, match="at least 4"):
        LatencyModel.fit(evals[:3])


def test_searchers_drive_the_encoder_evaluator_under_a_measured_limit(one_thread):
    model, x = tiny("bert")
    space = EncoderSpace.from_model(model)
    evaluate = EncoderEvaluator(model, [x], x, rank_inputs=[x], threads=1)
    small, big = evaluate(space.smallest()), evaluate(space.largest())
    assert big.accuracy == pytest.approx(1.0) and small.accuracy < big.accuracy
    assert big.latency_ms > 0 and small.latency_ms > 0  # measured; which is faster is a benchmark's question
    limit = (small.latency_ms + big.latency_ms) / 2
    tpe = optuna_search(space, evaluate, limit, trials=5, progress=False)  # type: ignore[arg-type]
    evo = evolve(space, evaluate, limit, generations=1, population=3, children=3, progress=False,  # type: ignore[arg-type]
                 start=tpe)
    everything = [small, big, *tpe, *evo]
    best = best_feasible(everything, limit)
    assert best is not None and best.latency_ms <= limit
    assert all(space.contains(e.arch) for e in everything)  # type: ignore[arg-type]
    assert space.mutate(space.smallest(), random.Random(0)) in set(space.members())


@pytest.mark.slow
def test_minilm_member_ranked_on_text_beats_weight_ranking_and_reloads(minilm_task, tmp_path):
    model, train, calib = minilm_task.model, minilm_task.train[:4], minilm_task.calib[:4]
    with torch.inference_mode():
        reference = [model(*b) for b in calib]
    arch = EncoderArch(layers=6, heads=6, ffn=768)
    by_text = subnet(model, arch, rank(model, train))
    by_weight = subnet(model, arch)
    cos_text, cos_weight = mean_cosine(by_text, reference, calib), mean_cosine(by_weight, reference, calib)
    assert cos_text > cos_weight + 0.05  # measured 0.637 vs 0.539 on held-out calibration text
    assert sum(p.numel() for p in by_text.parameters()) == EncoderSpace.from_model(model).param_count(arch)

    sk.save(by_text, tmp_path / "member")
    loaded = sk.load(tmp_path / "member")
    with torch.inference_mode():
        assert torch.equal(loaded(*calib[0]), by_text(*calib[0]))

    applied = sk.apply(model, sk.nas.Encoder(layers=3, heads=6, ffn=768), minilm_task)
    assert last_record(applied).arch == {"layers": 3, "heads": 6, "ffn": 768}


def test_best_per_depth_keeps_the_best_feasible_member_of_each_layer_count():
    evals = [Evaluation(EncoderArch(l, h, 64), acc, lat)  # type: ignore[arg-type]
             for l, h, acc, lat in [(2, 2, 0.5, 10), (2, 4, 0.6, 12), (2, 8, 0.9, 30), (4, 2, 0.7, 15), (6, 2, 0.8, 25)]]
    assert best_per_depth(evals, 20) == [EncoderArch(2, 4, 64), EncoderArch(4, 2, 64)]


@pytest.mark.slow
def test_short_distillation_raises_the_proxy_and_reranks(minilm_task, one_thread):
    evaluator = EncoderEvaluator(minilm_task.model, minilm_task.calib[:2], minilm_task.example,
                                 rank_inputs=minilm_task.train[:2], threads=1)
    archs = [EncoderArch(6, 3, 384), EncoderArch(2, 12, 1536)]
    untrained = {a: evaluator(a).accuracy for a in archs}
    ranked = rerank(evaluator, minilm_task, archs, steps=8, threads=1)
    assert [a for a, _ in ranked] == sorted(archs, key=lambda a: -dict(ranked)[a])
    assert all(cos > untrained[a] + 0.02 for a, cos in ranked)  # distillation moves every member toward fp32
