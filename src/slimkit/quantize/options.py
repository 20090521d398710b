"""Options the quantization configs share: layer selection, calibration and backend names, their checks,
and the search knobs several quantizers ask for."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import torch.nn as nn

from slimkit.core.config import BaseConfig
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView
from slimkit.core.registry import SearchContext
from slimkit.quantize.record import quant_report_section

#: Which layers a config quantizes: ``"all"`` (Linear + Conv2d), ``"all-linear"``, a regex matched
#: against module names, or a tuple of exact module names.
Targets = str | tuple[str, ...]

CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
BACKENDS = ("auto", "onnxruntime", "torch", "cuda")
EMBEDDING_BITS = (8, 4)


def check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise SlimkitError(f"{name}={value!r} is not supported", f"use one of {', '.join(map(repr, allowed))}")



#: Most layers accuracy control-style exclusion will keep in float.
MAX_SKIPPED = 3


def skip_sensitive_knob(trial: Any, ctx: SearchContext, prefix: str) -> str | tuple[str, ...]:
    """``exclude`` for a quantizer: the k most sensitive layers as a regex (also matching the parts
    a factorization split them into, ``fc1.0``/``fc1.1``), or nothing."""
    if not ctx.sensitivity:
        return ()
    k = trial.suggest_int(f"{prefix}.skip_sensitive", 0, min(MAX_SKIPPED, len(ctx.sensitivity)))
    names = ctx.most_sensitive(k)
    return "|".join(rf"{re.escape(n)}(\..+)?" for n in names) if names else ()


def embedding_bits_knob(trial: Any, ctx: SearchContext, prefix: str) -> int:
    """8 or 4 bits for the embedding tables; asked only when the model has one."""
    return int(trial.suggest_categorical(f"{prefix}.embedding_bits", [8, 4])) if ctx.has_embeddings() else 8


@dataclasses.dataclass(frozen=True)
class QuantConfig(BaseConfig):
    """What every quantization config shares: its report section (layers kept float, per-layer error), and
    being offered only to models with layers it converts (``LAYERS``)."""

    LAYERS: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        return any(isinstance(m, cls.LAYERS) for m in ctx.task.model.modules())

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        quant_report_section(report, record, view)


@dataclasses.dataclass(frozen=True)
class TrainedQuantConfig(QuantConfig):
    """A quantizer that trains (QAT, binary/ternary): the search offers it only where the task can train."""

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        return ctx.trainable and super().applies(ctx)


@dataclasses.dataclass(frozen=True)
class PTQConfig(QuantConfig):
    """The options post-training quantizers share: which layers, the runtime, accuracy control, embeddings.

    ``max_drop`` turns on accuracy control: the most sensitive layers go back to float until the
    task metric drops by at most this much. ``embeddings`` stores every ``nn.Embedding`` table (not
    excluded) quantized: in a small transformer the token table is most of the bytes;
    ``embedding_bits=4`` stores it as 4-bit codes in groups of 32 along the embedding dim.
    """

    targets: Targets = "all"
    exclude: Targets = ()
    backend: str = "auto"
    max_drop: float | None = None
    embeddings: bool = True
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        check_choice("backend", self.backend, BACKENDS)
        check_choice("embeddings", self.embeddings, (True, False))
        check_choice("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
        if self.max_drop is not None and self.max_drop < 0:
            raise SlimkitError(f"max_drop={self.max_drop} is negative", "use 0 or a positive metric difference")

