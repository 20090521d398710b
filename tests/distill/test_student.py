"""The 3-layer MiniLM student: alternate layers kept, reloads exactly, distillation pulls it toward the teacher."""

import pytest
import torch
import torch.nn.functional as F

import slimkit as sk
from slimkit.distill import Distill, distill, kept_layers, minilm_student


def test_kept_layers_are_evenly_spaced_and_end_at_the_last():
    assert kept_layers(6, 3) == [1, 3, 5]
    assert kept_layers(6, 2) == [2, 5]
    assert kept_layers(6, 6) == list(range(6))
    with pytest.raises(sk.SlimkitError):
        kept_layers(6, 0)


def calib_cosine(student, teacher, batches):
    with torch.inference_mode():
        return float(torch.cat([F.cosine_similarity(student(*b), teacher(*b), dim=-1) for b in batches]).mean())


@pytest.mark.slow
def test_minilm_student_reloads_and_distillation_moves_it_toward_the_teacher(tmp_path, minilm_task, one_thread):
    teacher = minilm_task.model
    student = minilm_student(teacher, 3)
    blocks = teacher.bert.encoder.layer
    per_block = sum(p.numel() for p in blocks[0].parameters())
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters()) - 3 * per_block
    assert torch.equal(student.bert.encoder.layer[0].intermediate.dense.weight, blocks[1].intermediate.dense.weight)
    assert student.bert.config.num_hidden_layers == 3 and teacher.bert.config.num_hidden_layers == 6
    loaded = sk.load(sk.save(student, tmp_path / "s"))
    batch = minilm_task.calib[0]
    with torch.inference_mode():
        assert torch.equal(loaded(*batch), student(*batch))
    held_out = minilm_task.calib[:4]
    before = calib_cosine(student, teacher, held_out)
    distill(student, minilm_task, Distill(steps=30, lr=1e-4), progress=False)
    after = calib_cosine(student, teacher, held_out)
    assert 0.5 < before < after, (before, after)
