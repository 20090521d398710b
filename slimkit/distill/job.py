"""``slimkit distill``: distill a task's model into a student, compare with plain fine-tuning, report.

The student is ``self`` (a copy of the task's model), ``layers:N`` (a BERT-style encoder keeping N
of its blocks, initialised from alternate layers) or the path of a saved artifact (e.g. the
``model`` directory ``slimkit prune`` or ``slimkit factorize`` wrote). With ``compare=True`` the
same student is also fine-tuned on the labels alone with the same seed and step budget, so the
report shows what distillation added.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit import io, zoo
from slimkit.candidate import measure_candidate
from slimkit.distill.distiller import Distill, distill
from slimkit.distill.student import minilm_student
from slimkit.errors import SlimkitError
from slimkit.job import comparison_report, summary


def parse_features(text: str | None) -> tuple[tuple[str, str], ...]:
    """``"s1:t1,s2:t2"`` -> ``(("s1", "t1"), ("s2", "t2"))``; ``"4"`` pairs a layer with itself."""
    if not text:
        return ()
    pairs = []
    for part in text.split(","):
        s, _, t = part.strip().partition(":")
        if not s:
            raise SlimkitError(f"--features entry {part!r} is empty", "write student_layer:teacher_layer,...")
        pairs.append((s, t or s))
    return tuple(pairs)


def load_student(spec: str, task: Any) -> nn.Module:
    """``self``, ``layers:N`` or an artifact directory."""
    if spec == "self":
        return copy.deepcopy(task.model)
    if spec.startswith("layers:"):
        try:
            keep = int(spec.split(":", 1)[1])
        except ValueError:
            raise SlimkitError(f"--student {spec!r}: N is not a number", "use e.g. --student layers:3") from None
        return minilm_student(task.model, keep)
    if not Path(spec).is_dir():
        raise SlimkitError(f"--student {spec!r} is not 'self', 'layers:N' or an artifact directory",
                           "pass a directory written by slimkit (e.g. runs/prune/model)")
    return io.load(spec)


def run(task_name: str, student_spec: str, config: Distill, out: str | Path, *, compare: bool = True,
        threads: int | None = None) -> Path:
    from rich.console import Console

    console = Console()
    out = Path(out)
    task = zoo.load(task_name)
    student = load_student(student_spec, task)
    teacher = measure_candidate("teacher", task.model, [], task, threads=threads)
    candidates = [teacher, measure_candidate("student before", student, [], task, threads=threads)]
    trained: dict[str, Any] = {}
    if compare and task.loss is not None:
        plain = copy.deepcopy(student)
        result = distill(plain, task, _plain(config), threads=threads)  # alpha=0: the hard-label loss only
        trained["fine-tuned"] = {"seconds": result.seconds, "final_loss": result.losses[-1]}
        candidates.append(measure_candidate(f"fine-tuned {config.steps} steps", plain, [_plain(config)], task,
                                            threads=threads))
    result = distill(student, task, config, threads=threads)
    trained["distilled"] = {"seconds": result.seconds, "final_loss": result.losses[-1]}
    candidates.append(measure_candidate(f"distilled {config.steps} steps", student, [config], task, threads=threads))
    io.save(student, out / "model", recipe=[config.to_dict()], extra={"task": task.name, "student": student_spec})
    r = comparison_report(f"slimkit distillation — {task.name}", "Teacher vs student", task, candidates, compute=True,
                          distill=config.to_dict(), student=student_spec, training=trained)
    r.note(f"Student {student_spec!r}; {config.steps} steps at lr {config.lr:g}, temperature {config.temperature}, "
           f"alpha {config.alpha}, features {list(config.features) or 'none'}, relational {config.relational}. "
           "'fine-tuned' is the same student, seed and steps trained on the labels alone.")
    path = r.write(out)
    console.print(summary(teacher, candidates[-1]))
    console.print(f"[green]report[/] {path}")
    return path


def _plain(config: Distill) -> Distill:
    """The same budget with the hard-label loss only: the control distillation must beat."""
    import dataclasses

    return dataclasses.replace(config, alpha=0.0, features=(), relational=0.0, output="logits")
