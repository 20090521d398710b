"""finetune: determinism, exact resume after a kill, early stopping, recovery of a damaged model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit import SlimkitError, Task
from slimkit.train import finetune, load_checkpoint
from slimkit.train.checkpoint import CHECKPOINT
from tests.train._digits_run import SETTINGS, damaged

ROOT = Path(__file__).resolve().parents[2]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_same_seed_gives_identical_weights(digits_task):
    a, b, c = (damaged(digits_task.model) for _ in range(3))
    ra = finetune(a, digits_task, steps=20, seed=5, progress=False)
    rb = finetune(b, digits_task, steps=20, seed=5, progress=False)
    finetune(c, digits_task, steps=20, seed=6, progress=False)
    assert_same_weights(a, b)
    assert ra.losses == rb.losses and len(ra.losses) == 20
    assert not torch.equal(a[0].weight, c[0].weight)  # the seed matters (shuffle order)


def test_resume_after_sigkill_matches_uninterrupted_run(digits_task, tmp_path):
    """A real process is killed mid-run; resuming from its last checkpoint gives bit-identical weights."""
    steps, every, threads = 60, 10, torch.get_num_threads()
    ckpt = tmp_path / "run" / CHECKPOINT
    proc = subprocess.Popen([sys.executable, "-m", "tests.train._digits_run", str(ckpt.parent), str(steps),
                             str(every), str(threads), "0.05"], cwd=ROOT, env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and load_checkpoint(ckpt)["step"] >= 20:
            proc.send_signal(signal.SIGKILL)
            killed_at = load_checkpoint(ckpt)["step"]
            break
        time.sleep(0.02)
    out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == -signal.SIGKILL, out
    assert killed_at is not None and 20 <= killed_at < steps and killed_at % every == 0

    resumed = damaged(digits_task.model)
    r = finetune(resumed, digits_task, steps=steps, checkpoint_dir=ckpt.parent, checkpoint_every=every, **SETTINGS)
    assert r.resumed_from >= killed_at and r.steps == steps

    straight = damaged(digits_task.model)
    s = finetune(straight, digits_task, steps=steps, **SETTINGS)
    assert_same_weights(resumed, straight)
    assert r.losses == s.losses and r.evals == s.evals and r.best_step == s.best_step
    assert [e[0] for e in r.evals] == [20, 40, 60]


def test_resume_after_crash_in_process_and_rerun_is_a_no_op(digits_task, tmp_path):
    def crash_at_25(model: nn.Module, step: int) -> None:
        if step == 25:
            raise KeyboardInterrupt

    first = damaged(digits_task.model)
    with pytest.raises(KeyboardInterrupt):
        finetune(first, digits_task, steps=40, checkpoint_dir=tmp_path, checkpoint_every=10, after_step=crash_at_25,
                 progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT)["step"] == 20
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temp files left behind

    resumed = damaged(digits_task.model)  # fresh weights: the checkpoint replaces them
    r = finetune(resumed, digits_task, steps=40, checkpoint_dir=tmp_path, checkpoint_every=10, progress=False)
    straight = damaged(digits_task.model)
    s = finetune(straight, digits_task, steps=40, progress=False)
    assert r.resumed_from == 20 and len(r.losses) == 40
    assert_same_weights(resumed, straight)
    assert r.losses == s.losses

    again = damaged(digits_task.model)  # the finished run's checkpoint: nothing left to do
    r2 = finetune(again, digits_task, steps=40, checkpoint_dir=tmp_path, checkpoint_every=10, progress=False)
    assert r2.resumed_from == 40 and r2.losses == s.losses
    assert_same_weights(again, straight)


def test_resume_refuses_other_settings_and_missing_checkpoint(digits_task, tmp_path):
    model = damaged(digits_task.model)
    finetune(model, digits_task, steps=5, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(SlimkitError, match="different settings \\(lr\\)"):
        finetune(model, digits_task, steps=5, lr=5e-4, checkpoint_dir=tmp_path, progress=False)
    r = finetune(model, digits_task, steps=5, lr=5e-4, checkpoint_dir=tmp_path, resume=False, progress=False)
    assert r.resumed_from is None and load_checkpoint(tmp_path / CHECKPOINT)["config"]["lr"] == 5e-4
    with pytest.raises(SlimkitError, match="no checkpoint"):
        finetune(model, digits_task, steps=5, checkpoint_dir=tmp_path / "empty", resume=True, progress=False)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(SlimkitError, match="unreadable"):
        finetune(model, digits_task, steps=5, checkpoint_dir=tmp_path, progress=False)


def test_finetuning_recovers_a_damaged_digits_model(digits_task):
    model = damaged(digits_task.model, scale=1.0)
    before = digits_task.evaluate(model)["score"]
    r = finetune(model, digits_task, steps=60, progress=False)
    after = digits_task.evaluate(model)["score"]
    # Measured: 0.997 trained, 0.10 damaged (chance), 0.986 after 60 steps.
    assert before < 0.6 and after >= 0.97 and after - before >= 0.4
    assert r.losses[-1] < r.losses[0] / 5 and not model.training


def _line_task(higher_is_better: bool) -> Task:
    """y = x @ w* with w* = 1: training walks w from 0 towards 1; the metric peaks at w = 0.5."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=gen)
    y = x @ torch.ones(4, 1)
    sign = -1.0 if higher_is_better else 1.0

    def closeness(model: nn.Module, _eval: object) -> float:
        return sign * float((model.weight - 0.5).norm())

    model = nn.Linear(4, 1, bias=False)
    nn.init.zeros_(model.weight)
    return Task(name="line", model=model, example=(x[:1],), metric=closeness, eval=None,
                train=[((x[i:i + 32],), y[i:i + 32]) for i in range(0, 256, 32)], loss=F.mse_loss,
                higher_is_better=higher_is_better)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_early_stopping_restores_the_best_weights(higher_is_better):
    task = _line_task(higher_is_better)
    r = finetune(task.model, task, steps=400, lr=0.02, warmup=0.0, eval_every=5, patience=3, progress=False)
    scores = [s for _, s in r.evals]
    best = max(scores) if higher_is_better else min(scores)
    assert r.stopped_early and r.steps < 400 and r.steps == r.best_step + 3 * 5
    assert r.best_score == best and scores.index(best) == len(scores) - 4
    assert r.restored_best and task.evaluate()["score"] == r.best_score
    assert abs(float(task.model.weight.detach().mean()) - 0.5) < 0.1  # the stopping point is the metric's peak
    assert len(r.losses) == r.steps


def test_params_subset_loss_override_and_after_step(digits_task):
    model = damaged(digits_task.model, scale=0.3)
    before = {k: v.clone() for k, v in model.named_parameters()}
    calls: list[int] = []
    seen: list[int] = []

    def loss(m: nn.Module, inputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        seen.append(labels.numel())
        return F.cross_entropy(m(*inputs), labels, label_smoothing=0.1)

    r = finetune(model, digits_task, steps=12, params=model[14].parameters(), loss=loss,
                 after_step=lambda m, step: calls.append(step), progress=False)
    assert calls == list(range(1, 13)) and seen == [64] * 12 and r.steps == 12
    for k, v in model.named_parameters():  # only the last Linear (index 14) moved
        assert torch.equal(v, before[k]) != k.startswith("14."), k


def test_unlabelled_batches_of_different_shapes_train_with_a_loss_override():
    model = nn.Embedding(10, 3)
    train = [(torch.randint(0, 10, (2, n)),) for n in (3, 5, 7)]  # token batches of three lengths
    task = Task(name="tokens", model=model, example=train[0], metric=lambda m, e: 0.0, eval=None, train=train)
    lengths: list[int] = []

    def loss(m: nn.Module, inputs: tuple, labels: None) -> torch.Tensor:
        assert labels is None
        lengths.append(inputs[0].shape[1])
        return m(*inputs).pow(2).mean()

    finetune(model, task, steps=6, loss=loss, progress=False)
    assert sorted(lengths[:3]) == [3, 5, 7] and sorted(lengths[3:]) == [3, 5, 7]  # each batch once per pass
    with pytest.raises(SlimkitError, match="no training loss"):
        finetune(model, task, steps=1, progress=False)


def test_errors_are_one_line_with_a_hint(digits_task):
    no_data = Task(name="empty", model=nn.Linear(2, 2), example=(torch.zeros(1, 2),), metric=lambda m, e: 0.0,
                   eval=None, loss=F.mse_loss)
    with pytest.raises(SlimkitError, match="task 'empty' has no training data") as e:
        finetune(no_data.model, no_data, steps=3, progress=False)
    assert e.value.hint and "\n" not in str(e.value)

    def nan_loss(m: nn.Module, inputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        return m(*inputs).sum() * float("nan")

    with pytest.raises(SlimkitError, match="loss became nan at step 1") as e:
        finetune(damaged(digits_task.model), digits_task, steps=3, loss=nan_loss, progress=False)
    assert "lower lr" in e.value.hint
    with pytest.raises(SlimkitError, match="checkpoint_dir"):
        finetune(no_data.model, no_data, steps=3, checkpoint_every=2, progress=False)


def test_progress_bar_runs(digits_task):
    r = finetune(damaged(digits_task.model), digits_task, steps=3, progress=True)
    assert r.steps == 3
