"""Post-training quantization configs. Handlers live in ``ptq.py``; they are registered there."""

from __future__ import annotations

import dataclasses

from slimkit.config import BaseConfig, register
from slimkit.errors import SlimkitError

#: Which layers a config quantizes: ``"all"`` (Linear + Conv2d), ``"all-linear"``, a regex matched
#: against module names, or a tuple of exact module names.
Targets = str | tuple[str, ...]

CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
BACKENDS = ("auto", "onnxruntime", "torch")
EMBEDDING_BITS = (8, 4)


def _check(name: str, value: object, allowed: tuple[object, ...]) -> None:
    if value not in allowed:
        raise SlimkitError(f"{name}={value!r} is not supported", f"use one of {', '.join(map(repr, allowed))}")


@register("quantize.Int8")
@dataclasses.dataclass(frozen=True)
class Int8(BaseConfig):
    """Int8 weights and activations, run on integer kernels.

    ``activations="dynamic"`` quantizes activations per batch at run time (no calibration);
    ``"static"`` uses ranges calibrated once on the task's calibration data with ``calibration``.
    Weights are symmetric int8, ``per_channel`` (one scale per output channel) or ``per_tensor``.
    ``max_drop`` turns on accuracy control: the most sensitive layers go back to float until the
    task metric drops by at most this much. ``embeddings`` stores every ``nn.Embedding`` table
    (not excluded) as int8 rows with a scale per row: in a small transformer the token table is
    most of the bytes. ``embedding_bits=4`` stores them as 4-bit codes in groups of 32 along the
    embedding dim (float16 scale and uint8 zero per group): MiniLM's table at ~4.75 instead of 8
    bits per value. Recipes written before this field existed load with the default, 8.
    """

    activations: str = "dynamic"
    calibration: str = "minmax"
    percentile: float = 99.99
    granularity: str = "per_channel"
    symmetric: bool = True
    targets: Targets = "all"
    exclude: Targets = ()
    backend: str = "auto"
    max_drop: float | None = None
    embeddings: bool = True
    embedding_bits: int = 8

    def __post_init__(self) -> None:
        _check("activations", self.activations, ("dynamic", "static"))
        _check("calibration", self.calibration, CALIBRATIONS)
        _check("granularity", self.granularity, ("per_channel", "per_tensor"))
        _check("backend", self.backend, BACKENDS)
        _check("embeddings", self.embeddings, (True, False))
        _check("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
        if not 50.0 < self.percentile <= 100.0:
            raise SlimkitError(f"percentile={self.percentile} is out of range", "use a value in (50, 100], e.g. 99.99")
        if self.max_drop is not None and self.max_drop < 0:
            raise SlimkitError(f"max_drop={self.max_drop} is negative", "use 0 or a positive metric difference")


@register("quantize.WeightOnly")
@dataclasses.dataclass(frozen=True)
class WeightOnly(BaseConfig):
    """Int8 or int4 weights with float activations: the memory-bound (small batch) win.

    ``group_size`` scales each run of that many input weights separately (int4 needs it for
    accuracy); 0 means one scale per output channel. ``embeddings`` / ``embedding_bits``: quantized
    embedding tables (8 or 4 bits), as in ``Int8``. ``method``: ``"rtn"`` rounds each weight to the
    nearest level; ``"gptq"`` (4-bit only) rounds with GPTQ's error feedback from the task's
    calibration inputs (``quantize.gptq``): at int4 g32 it keeps MiniLM's embeddings at cosine 0.98
    to fp32 where round-to-nearest gives 0.97.
    """

    bits: int = 8
    group_size: int = 0
    targets: Targets = "all-linear"
    exclude: Targets = ()
    backend: str = "auto"
    max_drop: float | None = None
    embeddings: bool = True
    embedding_bits: int = 8
    method: str = "rtn"

    def __post_init__(self) -> None:
        _check("bits", self.bits, (8, 4))
        _check("method", self.method, ("rtn", "gptq"))
        if self.method == "gptq" and self.bits != 4:
            raise SlimkitError("method='gptq' is for 4-bit weights here", "use bits=4, or method='rtn' for int8")
        _check("group_size", self.group_size, (0, 32, 64, 128, 256))
        _check("backend", self.backend, BACKENDS)
        _check("embeddings", self.embeddings, (True, False))
        _check("embedding_bits", self.embedding_bits, EMBEDDING_BITS)
        if self.max_drop is not None and self.max_drop < 0:
            raise SlimkitError(f"max_drop={self.max_drop} is negative", "use 0 or a positive metric difference")
        if self.bits == 4 and self.group_size == 0:
            raise SlimkitError("4-bit weights need a group size", "use group_size=32, 64 or 128")
        if self.bits == 8 and self.group_size != 0:
            raise SlimkitError("8-bit weight-only quantization is per output channel", "use group_size=0")
