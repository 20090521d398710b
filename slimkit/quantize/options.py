"""Options the quantization configs share: layer selection, calibration and backend names, their checks,
and the search knobs several quantizers ask for."""

from __future__ import annotations

import re
from typing import Any

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import SearchContext

#: Which layers a config quantizes: ``"all"`` (Linear + Conv2d), ``"all-linear"``, a regex matched
#: against module names, or a tuple of exact module names.
Targets = str | tuple[str, ...]

CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
BACKENDS = ("auto", "onnxruntime", "torch")
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
