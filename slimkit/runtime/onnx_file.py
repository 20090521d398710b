"""The ONNX file a model was measured with, kept as a deployable file beside its artifact.

A model slimkit serves on ONNX Runtime was exported, quantized and checked against torch before it
was timed and scored; that exact file is what a user deploys. It is copied (atomically) to
``model.onnx`` with a ``model.onnx.json`` sidecar naming its inputs and outputs, their element
types and shapes (symbolic names mark the dynamic axes), the ONNX Runtime version and the op
types it runs — everything a program with only ``onnxruntime`` and ``numpy`` needs to call it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from slimkit.core.atomic import atomic_write
from slimkit.runtime.ort import OrtModel

ONNX_FILE = "model.onnx"
SIDECAR = f"{ONNX_FILE}.json"


def describe(runnable: OrtModel) -> dict[str, Any]:
    """Inputs, outputs (name, element type, shape with symbolic dynamic axes), runtime and op types."""
    import onnxruntime as ort  # optional (extra 'onnx'): imported when used

    def io(args: list[Any]) -> list[dict[str, Any]]:
        return [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in args]

    return {"inputs": io(runnable.session.get_inputs()), "outputs": io(runnable.session.get_outputs()),
            "onnxruntime": ort.__version__, "threads_measured": runnable.threads,
            "op_types": dict(sorted(runnable.kernels.items())), "kept_float": dict(runnable.skipped),
            "run": "onnxruntime.InferenceSession(path).run(None, {input name: numpy array, ...}); "
                   "dimensions given as names are dynamic"}


def keep_onnx(runnable: Any, directory: str | Path, name: str = ONNX_FILE) -> Path | None:
    """Copy the measured ONNX file into ``directory`` (``model.onnx`` + sidecar); None when ``runnable`` is
    not an ONNX Runtime model (served by torch: there is no measured ONNX file to keep, and an earlier
    run's file there is removed)."""
    directory = Path(directory)
    if not isinstance(runnable, OrtModel):
        for stale in (name, f"{name}.json"):  # an earlier run's file must not pass for this model
            (directory / stale).unlink(missing_ok=True)
        return None
    path = directory / name
    with open(runnable.path, "rb") as src:
        atomic_write(path, lambda f: shutil.copyfileobj(src, f))
    text = json.dumps(describe(runnable), indent=2).encode()
    atomic_write(directory / f"{name}.json", lambda f: f.write(text))
    return path


__all__ = ["ONNX_FILE", "SIDECAR", "describe", "keep_onnx"]
