"""NAS and fusion as optimizer techniques: listed in their stages, valid configs from fixed trials, a trained member."""

from __future__ import annotations

import optuna

import slimkit as sk
from slimkit.architecture import Fuse
from slimkit.core.registry import SearchContext
from slimkit.core.registry import searchable as techniques
from slimkit.core.target import Target
from slimkit.nas import CNN


def _ctx(task) -> SearchContext:
    return SearchContext(task=task, target=Target(max_drop=0.01), baseline={}, trainable=True,
                         extra={"nas_steps": 150})


def test_techniques_list_nas_and_fuse_in_their_stages():
    found = {t.search: t.stage for t in techniques()}
    assert found["nas"] == "nas" and found["fuse"] == "fuse"
    names = [t.search for t in techniques(["fuse", "nas"])]
    assert names == ["nas", "fuse"]  # stage order: nas first, fuse last


def test_fixed_trials_give_valid_configs(mnist_task, one_thread):
    nas, fuse = techniques(["nas", "fuse"])
    ctx = _ctx(mnist_task)
    assert nas.applies(ctx) and fuse.applies(ctx)
    assert not nas.applies(SearchContext(task=mnist_task, target=Target(), baseline={}, trainable=False))
    trial = optuna.trial.FixedTrial({"nas.width0": 8, "nas.width1": 16, "nas.width2": 32, "nas.depth0": 1,
                                     "nas.depth1": 1, "nas.depth2": 1, "nas.kernel0": 3, "nas.kernel1": 3,
                                     "nas.kernel2": 3, "nas.hidden": 64})
    cfg = nas.suggest(trial, ctx)
    assert cfg == CNN(widths=(8, 16, 32), depths=(1, 1, 1), kernels=(3, 3, 3), hidden=64, steps=150)
    assert sk.BaseConfig.from_json(cfg.to_json()) == cfg
    assert fuse.suggest(optuna.trial.FixedTrial({"fuse.compile": "onnxruntime"}), ctx) == Fuse(compile="onnxruntime")
    assert fuse.suggest(optuna.trial.FixedTrial({"fuse.compile": "none"}), ctx) == Fuse(compile=None)
    model = sk.apply(mnist_task.model, cfg, mnist_task)
    assert sum(p.numel() for p in model.parameters()) == 9 * 8 + 8 + 16 + 9 * 8 * 16 + 16 + 32 + 9 * 16 * 32 + 32 \
        + 64 + 288 * 64 + 64 + 650
    assert mnist_task.evaluate(model)["score"] >= 0.9  # 150 steps with distillation from the original
    assert all(p.requires_grad for p in mnist_task.model.parameters())  # the caller's model is not frozen


def test_nas_config_refuses_mismatched_stages():
    import pytest

    with pytest.raises(sk.SlimkitError, match="one width, depth and kernel per stage"):
        CNN(widths=(8, 16), depths=(1,), kernels=(3, 3))
