"""Build a (folded) model on a compiling runtime and time what each runtime gives.

``"inductor"`` is ``torch.compile``: it needs a working C++ compiler on CPU; when the build fails
(no compiler, an unsupported op) the error says so in one line instead of a compiler log.
``"onnxruntime"`` exports the model and lets ONNX Runtime's graph optimizer fuse Conv+BN+ReLU
(``FusedConv``) and Gemm+activation (``slimkit.runtime.build``).
"""

from __future__ import annotations

import shutil
from typing import Any, Callable

import torch
import torch.nn as nn

from slimkit.errors import SlimkitError
from slimkit.measure import measure_latency


def inductor_available() -> tuple[bool, str]:
    """Whether torch.compile can build CPU kernels here, and why not when it cannot."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False, "no C++ compiler on PATH (inductor generates C++ for CPU)"
    return True, "ok"


def compiled(model: nn.Module, example: tuple[torch.Tensor, ...] | torch.Tensor, backend: str | None = None, *,
             threads: int | None = None) -> Callable[..., Any]:
    """A runnable for ``model``: eager (None), ``torch.compile`` (``"inductor"``) or ONNX Runtime.

    ``backend=None`` uses the choice a :class:`~slimkit.architecture.fuse.Fuse` config recorded.
    The compiled runnable is called once on ``example`` here, so compilation cost is paid now.
    """
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if backend is None:
        backend = getattr(model, "slimkit_fuse", {}).get("compile")
    model = model.eval()
    if backend is None:
        return model
    if backend == "onnxruntime":
        from slimkit.runtime import build

        return build(model, "onnxruntime", example, threads=threads)
    if backend != "inductor":
        raise SlimkitError(f"compile backend {backend!r} is not known", "use None, 'inductor' or 'onnxruntime'")
    ok, why = inductor_available()
    if not ok:
        raise SlimkitError(f"torch.compile (inductor) cannot run here: {why}", "use compile='onnxruntime' or None")
    fn = torch.compile(model, backend="inductor", dynamic=False)
    try:
        with torch.inference_mode():
            fn(*example)
    except Exception as exc:  # compiler missing or failing: a one-line reason, not its log
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SlimkitError(f"torch.compile (inductor) failed: {first}", "use compile='onnxruntime' or None") from None
    return fn


def compare_runtimes(models: dict[str, nn.Module], example: tuple[torch.Tensor, ...] | torch.Tensor,
                     backends: tuple[str | None, ...] = (None, "inductor", "onnxruntime"), *,
                     threads: int | None = None, min_time_s: float = 0.5) -> dict[str, dict[str, Any]]:
    """p50/mean ms of every model on every backend; a backend that cannot build is reported, not raised."""
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    rows: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        for backend in backends:
            key = f"{name} / {backend or 'eager'}"
            try:
                run = compiled(model, example, backend, threads=threads)
            except SlimkitError as exc:
                rows[key] = {"error": exc.problem if hasattr(exc, "problem") else str(exc)}
                continue
            lat = measure_latency(run, example, threads=threads, min_time_s=min_time_s)
            rows[key] = {"p50_ms": lat.p50_ms, "mean_ms": lat.mean_ms, "p95_ms": lat.p95_ms, "runs": lat.runs}
    return rows
