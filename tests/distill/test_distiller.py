"""Distill: beats plain fine-tuning on real digits, feature hooks and projections, frozen teacher, configs."""

import dataclasses

import pytest
import torch

import slimkit as sk
from slimkit.distill import Distill, DistillLoss, distill, teacher_model
from slimkit.factorize import Tucker
from slimkit.prune import Magnitude

#: Few labelled images (128 of 1,437): where the teacher's soft targets add the most. Measured on this
#: setup (test accuracy, seeds 0/1/2): plain 0.744/0.736/0.731, distilled 0.750/0.753/0.747. At
#: temperature 4 this small student does worse (0.70 on the full data): matching every logit of a
#: confident teacher costs the capacity it needs for the argmax, so the test uses T=1.
SMALL_TRAIN_BATCHES = 2


def small_task(task):
    return dataclasses.replace(task, train=task.train[:SMALL_TRAIN_BATCHES])


def student_of(task):
    return sk.apply(task.model, Tucker(ratio=0.3))


@pytest.mark.slow
def test_distillation_beats_plain_finetuning_with_the_same_budget(digits_task, one_thread):
    task = small_task(digits_task)
    gains = []
    for seed in (0, 1, 2):
        scores = {}
        for name, alpha in (("plain", 0.0), ("distilled", 0.9)):
            student = student_of(task)
            distill(student, task, Distill(alpha=alpha, temperature=1.0, steps=150, lr=3e-3, seed=seed),
                    progress=False)
            scores[name] = task.evaluate(student)["score"]
        gains.append(scores["distilled"] - scores["plain"])
    assert min(gains) > 0 and sum(gains) / 3 >= 0.01, gains


def test_feature_distillation_trains_projections_and_removes_its_hooks(digits_task, one_thread):
    student = student_of(digits_task)
    teacher_state = {k: v.clone() for k, v in digits_task.model.state_dict().items()}
    config = Distill(features=(("6", "6"), ("9", "9")), relational=1.0, steps=30, alpha=1.0)
    loss = DistillLoss(student, digits_task.model, digits_task, config)
    assert [tuple(p.shape) for p in loss.params] == [(32, 32, 1, 1), (64, 64, 1, 1)]  # identity-initialised 1x1
    assert torch.equal(loss.params[0].detach().flatten(1), torch.eye(32))
    x, y = digits_task.train[0]
    with loss.hooked():
        first = float(loss(student.train(), x, y).detach())
    result = distill(student, digits_task, config, progress=False)
    assert result.steps == 30 and result.losses[-1] < first
    for model in (student, digits_task.model):
        assert all(not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, digits_task.model.state_dict()[k]) for k, v in teacher_state.items())  # frozen
    assert not student.training


def test_pruned_student_keeps_its_zeros(digits_task, one_thread):
    student = sk.apply(digits_task.model, Magnitude(amount=0.7))
    zeros = [int((m.weight == 0).sum()) for m in student.modules() if hasattr(m, "weight") and m.weight is not None
             and m.weight.dim() > 1]
    distill(student, digits_task, Distill(steps=20), progress=False)
    after = [int((m.weight == 0).sum()) for m in student.modules() if hasattr(m, "weight") and m.weight is not None
             and m.weight.dim() > 1]
    assert after == zeros


def test_teacher_from_an_artifact_and_self_teacher_copy(tmp_path, digits_task):
    path = sk.save(digits_task.model, tmp_path / "teacher")
    student = student_of(digits_task)
    teacher = teacher_model(Distill(teacher=str(path)), digits_task, student)
    x = digits_task.calib[0][0]
    with torch.inference_mode():
        assert torch.equal(teacher(x), digits_task.model(x))
    assert teacher_model(Distill(), digits_task, digits_task.model) is not digits_task.model  # never its own student
    with pytest.raises(sk.SlimkitError, match="not a slimkit artifact"):
        teacher_model(Distill(teacher=str(tmp_path)), digits_task, student)


def test_unknown_feature_layer_and_bad_options_are_one_line_errors(digits_task):
    with pytest.raises(sk.SlimkitError) as e:
        DistillLoss(student_of(digits_task), digits_task.model, digits_task, Distill(features=(("nope", "6"),)))
    assert "student has no layer 'nope'" in str(e.value) and "\n" not in str(e.value)
    for kwargs in ({"temperature": 0}, {"alpha": 1.5}, {"steps": 0}, {"lr": -1.0}, {"output": "x"},
                   {"features": (("a",),)}):
        with pytest.raises(sk.SlimkitError) as e:
            Distill(**kwargs)
        assert "\n" not in str(e.value)


def test_config_round_trips_json():
    c = Distill(features=(("a.b", "c.d"), ("e", "e")), temperature=2.0, relational=0.5, steps=10)
    back = sk.BaseConfig.from_json(c.to_json())
    assert back == c and back.features == (("a.b", "c.d"), ("e", "e"))
