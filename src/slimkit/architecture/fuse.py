"""``architecture.Fuse``: fold BatchNorm into the Conv/Linear before it (``slimkit.graph.batchnorm``),
then optionally compile.

Eager PyTorch on CPU has no conv+activation kernel, so the activation is fused by the compile
step: inductor fuses it into the conv epilogue, ONNX Runtime into ``FusedConv``. The stage runs
before quantization, so the quantizer sees the folded layers.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record, last_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.graph.batchnorm import find_pairs, fold_batchnorm
from slimkit.measure import measure_latency
from slimkit.runtime import build

COMPILERS = (None, "inductor", "onnxruntime")


@technique("architecture.Fuse", stage="fuse", search="fuse")
@dataclasses.dataclass(frozen=True)
class Fuse(BaseConfig):
    """Fold every BatchNorm into its conv/linear; ``compile`` names the runtime that fuses the rest.

    ``compile``: None (eager torch), ``"inductor"`` (torch.compile) or ``"onnxruntime"`` (ORT's
    graph optimizations). The handler returns the folded eager model and records the choice;
    :func:`compiled` builds the runnable.
    """

    version: ClassVar[int] = 1
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.compile not in COMPILERS:
            raise SlimkitError(f"architecture.Fuse compile={self.compile!r} is not known",
                               "use None, 'inductor' or 'onnxruntime'")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return fuse(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Fuse:
        """One knob: the compiler (``fuse.compile``); inductor is offered only where it can build."""
        choices = ["none", "onnxruntime"] + (["inductor"] if inductor_available()[0] else [])
        choice = trial.suggest_categorical("fuse.compile", choices)
        return cls(compile=None if choice == "none" else choice)

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        """Only models with a BatchNorm that follows a conv/linear have anything to fold."""
        model: nn.Module = ctx.task.model
        if not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in model.modules()):
            return False
        try:
            return bool(find_pairs(model.eval(), tuple(ctx.task.example)))
        except Exception:  # noqa: BLE001 - a model that cannot even run its example is not ours to judge here
            return False

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        if isinstance(record, FuseRecord):
            report.note(f"{record.technique}: folded {len(record.folded)} BatchNorm(s) "
                        f"({', '.join(record.folded) or 'none'}); compiler {record.compile or 'none (eager)'}")


@dataclasses.dataclass
class FuseRecord(StepRecord):
    """BatchNorms folded away, and the compiler the deployed runnable is built with."""

    folded: list[str] = dataclasses.field(default_factory=list)
    compile: str | None = None


def fuse(model: nn.Module, config: Fuse, task: Task | None) -> nn.Module:
    """Handler of :class:`Fuse`: fold BatchNorms (checked on ``task.example``), record the compile choice."""
    example = getattr(task, "example", None)
    if example is None:
        raise SlimkitError("architecture.Fuse needs example inputs to find and check the folds",
                           "pass a task (or an object with .example)")
    folded, names = fold_batchnorm(model, example)
    add_record(folded, FuseRecord(config.type_name, config.to_dict(), folded=names, compile=config.compile))
    return folded


def inductor_available() -> tuple[bool, str]:
    """Whether torch.compile can build CPU kernels here, and why not when it cannot."""
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False, "no C++ compiler on PATH (inductor generates C++ for CPU)"
    return True, "ok"


def compiled(model: nn.Module, example: tuple[torch.Tensor, ...] | torch.Tensor, backend: str | None = None, *,
             threads: int | None = None) -> Callable[..., Any]:
    """A runnable for ``model``: eager (None), ``torch.compile`` (``"inductor"``) or ONNX Runtime.

    ``backend=None`` uses the choice a :class:`Fuse` step recorded.
    The compiled runnable is called once on ``example`` here, so compilation cost is paid now.
    """
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if backend is None:
        record = last_record(model, FuseRecord)
        backend = record.compile if record is not None else None
    model = model.eval()
    if backend is None:
        return model
    if backend == "onnxruntime":
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



