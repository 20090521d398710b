"""Smaller students of a transformer encoder: keep every other layer, initialised from the teacher.

DistilBERT's recipe: a student with half the layers starts from the teacher's own layers (taken
at a stride), which is a far better start than random weights; distillation then teaches the
kept layers to do the work of the dropped ones. The last layer is always kept, so the student's
output space starts close to the teacher's.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from pathlib import Path

import torch.nn as nn

from slimkit import io
from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import StepRecord, add_record
from slimkit.core.registry import build_registered, builder
from slimkit.core.task import Task
from slimkit.graph.blocks import keep_blocks, name_subnet


def kept_layers(total: int, keep: int) -> list[int]:
    """Indices of ``keep`` of ``total`` layers, evenly spaced and ending at the last (6, 3 -> [1, 3, 5])."""
    if not 1 <= keep <= total:
        raise SlimkitError(f"keep={keep} layers of {total} is invalid", f"use 1 to {total}")
    return [round((i + 1) * total / keep) - 1 for i in range(keep)]


def _encoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """The HF encoder whose ``.layer`` ModuleList holds the transformer blocks, and its name."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "layer", None), nn.ModuleList) and name.endswith("encoder"):
            return module, name
    raise SlimkitError(f"{type(model).__name__} has no '<...>.encoder.layer' list of transformer blocks",
                       "minilm_student expects a BERT-style encoder such as the minilm task's model")


def truncate(model: nn.Module, indices: list[int]) -> nn.Module:
    """``model`` (in place) with only the encoder blocks at ``indices``; configs and layer indices synced."""
    return keep_blocks(model, indices)


def minilm_student(model: nn.Module, keep: int = 3) -> nn.Module:
    """A copy of a BERT-style encoder with ``keep`` of its layers (from alternate layers).

    The copy saves and reloads through ``slimkit.load`` when the model has a builder (the base
    architecture cut to ``keep`` blocks).
    """
    encoder, _ = _encoder_layers(model)
    indices = kept_layers(len(encoder.layer), keep)
    student = truncate(copy.deepcopy(model), indices)
    name_subnet(student, model, keep)
    return student.eval()


@builder("minilm_student")
def build_minilm_student(layers: int = 3) -> nn.Module:
    """The minilm architecture with ``layers`` encoder blocks (weights come from the artifact)."""
    model = truncate(build_registered("minilm", {"pretrained": False}, what="minilm student"), list(range(layers)))
    model.slimkit_builder = ("minilm_student", {"layers": layers})
    return model


@technique("distill.Student", stage="nas")
@dataclasses.dataclass(frozen=True)
class Student(BaseConfig):
    """The student a distillation starts from: the encoder with ``layers`` of its blocks, taken at a stride."""

    layers: int = 3

    def __post_init__(self) -> None:
        if not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers < 1:
            raise SlimkitError(f"distill.Student layers={self.layers!r} is invalid", "use a positive number of blocks")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        encoder, _ = _encoder_layers(model)
        student = minilm_student(model, self.layers)
        add_record(student, StudentRecord(self.type_name, self.to_dict(),
                                          kept_layers=kept_layers(len(encoder.layer), self.layers), of=len(encoder.layer)))
        return student


@dataclasses.dataclass
class StudentRecord(StepRecord):
    """Which of the teacher's blocks the student kept."""

    kept_layers: list[int] = dataclasses.field(default_factory=list)
    of: int = 0


@technique("distill.StudentArtifact", stage="nas")
@dataclasses.dataclass(frozen=True)
class StudentArtifact(BaseConfig):
    """Start from a student saved elsewhere: the model becomes the artifact at ``path`` (its weights' SHA-256
    is checked, so a recipe never replays onto a different file)."""

    path: str = ""
    sha256: str = ""

    @classmethod
    def of(cls, path: str | Path) -> StudentArtifact:
        return cls(path=str(path), sha256=_weights_digest(Path(path)))

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        if not self.path:
            raise SlimkitError("distill.StudentArtifact needs the path of a saved artifact",
                               "give path=DIR (a directory written by slimkit.save)")
        digest = _weights_digest(Path(self.path))
        if self.sha256 and digest != self.sha256:
            raise SlimkitError(f"the student artifact {self.path} changed since the recipe was written",
                               "restore that artifact, or write the recipe anew")
        student = io.load(self.path)
        add_record(student, StepRecord(self.type_name, self.to_dict()))
        return student


def _weights_digest(path: Path) -> str:
    file = path / io.WEIGHTS
    if not file.is_file():
        raise SlimkitError(f"{path} is not a slimkit artifact (no {io.WEIGHTS})", "give a directory written by slimkit.save")
    return hashlib.sha256(file.read_bytes()).hexdigest()

