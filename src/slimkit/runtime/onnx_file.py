"""The ONNX file a model was measured with, kept as a deployable file beside its artifact.

A model slimkit serves on ONNX Runtime was exported, quantized and checked against torch before it
was timed and scored; that exact file is what a user deploys. It is copied (atomically) to
``model.onnx`` with a ``model.onnx.json`` sidecar naming its inputs and outputs, their element
types and shapes (symbolic names mark the dynamic axes, also listed as ``dynamic_axes``), the ONNX
Runtime version, the op types it runs, how each weight-only layer's weight is stored (``weights``)
and which layers stay float and why (``kept_float``) — everything a program with only
``onnxruntime`` and ``numpy`` needs to call it. ``"measured": false`` marks a file built only for
export, of a model measured and served on torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from slimkit.core.atomic import atomic_write
from slimkit.runtime.ort import OrtModel

ONNX_FILE = "model.onnx"
SIDECAR = f"{ONNX_FILE}.json"


def describe(runnable: OrtModel) -> dict[str, Any]:
    """Inputs, outputs (name, element type, shape with symbolic dynamic axes), runtime and op types."""
    import onnxruntime as ort  # optional (extra 'onnx'): imported when used

    def io(args: list[Any]) -> list[dict[str, Any]]:
        return [{"name": a.name, "type": a.type, "shape": list(a.shape)} for a in args]

    inputs, outputs = io(runnable.session.get_inputs()), io(runnable.session.get_outputs())
    return {"inputs": inputs, "outputs": outputs,
            "dynamic_axes": {a["name"]: {str(i): d for i, d in enumerate(a["shape"]) if isinstance(d, str)}
                             for a in inputs + outputs},
            "onnxruntime": ort.__version__, "threads_measured": runnable.threads,
            "quantization": getattr(runnable, "mode", "float"),
            "op_types": dict(sorted(runnable.kernels.items())), "layers": dict(runnable.layer_kernels),
            "weights": dict(getattr(runnable, "storage", {})), "kept_float": dict(runnable.skipped),
            "measured": True,
            "run": "onnxruntime.InferenceSession(path).run(None, {input name: numpy array, ...}); "
                   "dimensions given as names are dynamic"}


def keep_onnx(runnable: Any, directory: str | Path, name: str = ONNX_FILE, *,
              unmeasured: str | None = None) -> Path | None:
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
    info = describe(runnable)
    if unmeasured:  # built for export only: the model was measured (and is served) on another runtime
        info |= {"measured": False, "served_by": unmeasured}
    text = json.dumps(info, indent=2).encode()
    atomic_write(directory / f"{name}.json", lambda f: f.write(text))
    return path


#: Where a run directory keeps its measured file: technique commands, then ``optimize``.
RUN_FILES = (ONNX_FILE, "best.onnx")
#: Where a run directory keeps its artifact: technique commands, then ``optimize``.
RUN_ARTIFACTS = ("model", "best")


def export_onnx_file(source: str | Path, out: str | Path, example: Any = None, *, threads: int | None = None) -> Path:
    """``out`` (a .onnx path) holding the ONNX file ``source`` was measured with: copied from a run directory
    that kept it, else rebuilt from the artifact (``source`` itself, or the run's ``model/`` / ``best/``) on the
    runtime it was measured on, with ``example`` inputs. A model measured on torch is built on ONNX Runtime
    for export (checked against torch like every build) and its sidecar says ``"measured": false`` and which
    runtime serves it; one ONNX Runtime cannot run (mixed precision) is a one-line error."""
    from slimkit.core.errors import SlimkitError
    from slimkit.io import read_meta
    from slimkit.runtime import backend_reason, load_deployed

    source, out = Path(source), Path(out)
    if out.suffix != ".onnx":
        raise SlimkitError(f"--out {out} does not end in .onnx", "name the file to write, e.g. model.onnx")
    kept = next((source / name for name in RUN_FILES if (source / name).is_file()), None)
    if kept is not None:
        with open(kept, "rb") as src:
            atomic_write(out, lambda f: shutil.copyfileobj(src, f))
        sidecar = kept.with_name(f"{kept.name}.json")
        if sidecar.is_file():
            text = sidecar.read_bytes()
            atomic_write(out.with_name(f"{out.name}.json"), lambda f: f.write(text))
        return out
    artifact = next((source / name for name in RUN_ARTIFACTS if (source / name).is_dir()), source)
    if example is None:
        raise SlimkitError(f"{source} keeps no measured ONNX file, and rebuilding one needs example inputs",
                           "give the task (--task / --model) the model was made for")
    runnable = load_deployed(artifact, example, threads=threads)
    served = ""
    if not isinstance(runnable, OrtModel):  # served by torch: the file is built for export, and says so
        from slimkit.io import load
        from slimkit.runtime import build

        model = runnable if isinstance(runnable, torch.nn.Module) else load(artifact)
        served = backend_reason(model, read_meta(artifact).get("extra", {}).get("backend") or "auto")
        try:
            runnable = build(model, "onnxruntime", example, threads=threads)
        except SlimkitError as exc:
            raise SlimkitError(f"{artifact} runs on torch, and ONNX Runtime cannot run it: {exc.args[0]}",
                               "use slimkit.load(path) in Python") from None
    path = keep_onnx(runnable, out.parent, out.name, unmeasured=served or None)
    assert path is not None
    return path


__all__ = ["ONNX_FILE", "RUN_ARTIFACTS", "RUN_FILES", "SIDECAR", "describe", "export_onnx_file", "keep_onnx"]
