"""What ``slimkit.load`` of a quantized artifact gives back, said in one line.

An artifact stores the integers; ``load`` rebuilds the torch layers that hold them. Those run torch's
kernels (weight-only int8/int4 kernels, fbgemm dynamic int8) or, where torch has none on this CPU,
the *reference float form*: fake-quantized activations and dequantized fp32 weights, the same
integer math in float. The model a search or a command measured may instead have run on ONNX
Runtime; that deployable model is a file (``OUT/model.onnx``), not a torch module. So after loading
a quantized artifact, ``load`` logs which form it returned and where the measured one is.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn

log = logging.getLogger("slimkit.io")
#: Kernel names of layers that run the float reference of their integer math (``quantize.modules``).
REFERENCE_KERNELS = ("fake-quant+dequant-fp32", "dequant-fp32")
_said: set[str] = set()
#: slimkit's own loads (a search checking the best it copied) are not the user's: nothing to tell them.
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("slimkit_quiet_loads", default=False)


@contextlib.contextmanager
def loads_unannounced() -> Iterator[None]:
    """Loads inside do not log which form they returned (the model still carries ``slimkit_loaded_form``)."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)


def loaded_form(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> str:
    """One line: the kernels the loaded quantized layers run and where the deployable file is ("" for a
    model with no quantized layer)."""
    kernels = Counter(str(k) for m in model.modules() if (k := getattr(m, "kernel", None)) is not None)
    if not kernels:
        return ""
    path = Path(path)
    run = path.parent if path.name in ("model", "best") else path  # a command's / optimize's OUT, else the artifact
    onnx = run / ("best.onnx" if path.name == "best" else "model.onnx")
    export = f"`slimkit export {run} --format onnx` writes it"
    reference = sum(n for k, n in kernels.items() if k in REFERENCE_KERNELS)
    used = ", ".join(f"{n} x {k}" for k, n in kernels.most_common())
    if reference:
        head = (f"loaded the reference float form of {path} ({reference} of {sum(kernels.values())} quantized "
                f"layers run fake-quant / dequantized fp32 on torch: {used})")
    else:
        head = f"loaded {path} on torch's integer kernels ({used})"
    if (meta.get("extra") or {}).get("backend") == "onnxruntime":
        return f"{head}; the deployable model measured on ONNX Runtime is {onnx}" + ("" if onnx.is_file() else
                                                                                   f" ({export})")
    if reference:
        return f"{head}; its ONNX Runtime form runs integer kernels: {export}"
    return head


def say_loaded_form(model: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> None:
    """Log ``loaded_form`` once per artifact path and process (a warning when it is not the measured form);
    the line is also kept on the model as ``slimkit_loaded_form``."""
    line = loaded_form(model, path, meta)
    if not line:
        return
    model.slimkit_loaded_form = line  # type: ignore[assignment]  # readable after the log is gone
    key = str(Path(path).resolve())
    if key in _said or _QUIET.get():
        return
    _said.add(key)
    measured_elsewhere = "reference float form" in line or "measured on ONNX Runtime" in line
    log.log(logging.WARNING if measured_elsewhere else logging.INFO, line)


__all__ = ["REFERENCE_KERNELS", "loaded_form", "loads_unannounced", "say_loaded_form"]
