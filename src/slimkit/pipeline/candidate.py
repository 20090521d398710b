"""A candidate model measured the way slimkit compares models: metric, bytes, latency, on its runtime.

Size and per-layer cost come from the torch model (its saved artifact); latency and the metric
come from the runnable built on the backend it deploys to — a quantized model's quality and
speed are never taken from a float or fake-quantized stand-in.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import torch.nn as nn

from slimkit.core.config import BaseConfig
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.measure import Latency, Profile, artifact_size, count_params, measure_latency, peak_memory, profile
from slimkit.measure.speed_ratio import SpeedRatio
from slimkit.report.metric_change import METRIC_CHANGE, metric_change
from slimkit.quantize.modules import EMULATED
from slimkit.runtime import build, resolve_backend

log = logging.getLogger("slimkit.pipeline")


@dataclasses.dataclass
class Candidate:
    """What was measured of one model; ``None`` = not measured (a limit broke first, or not asked for)."""

    name: str
    recipe: list[dict[str, Any]]
    backend: str
    metric: dict[str, float] | None = None
    profile: Profile | None = None    # torch model: artifact bytes, params, MACs, per-layer breakdown
    latency: Latency | None = None    # the deployed runnable
    size_mb: float | None = None
    params: int | None = None
    memory_mb: float | None = None
    stopped_at: str | None = None     # the limit that ended measuring early ("size", "memory", "latency")
    runtime_skipped: dict[str, str] | None = None  # layers the runtime kept in float, with its reason
    seconds: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)  # phase -> seconds (where the time went)
    #: vs the original as given, and vs the original on this candidate's runtime: timed in the same rounds.
    speedup: SpeedRatio | None = None
    speedup_same_runtime: SpeedRatio | None = None
    emulated: str | None = None  # why this runtime's timing backs no speed claim (integer math emulated in fp32)
    model: nn.Module = dataclasses.field(repr=False, default=None)  # type: ignore[assignment]
    runnable: Any = dataclasses.field(repr=False, default=None)

    def lap(self, phase: str, since: float) -> float:
        """Record the seconds since ``since`` under ``phase``; returns now (the next phase's start)."""
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - since
        return now

    def stop(self, limit: str, start: float) -> Candidate:
        self.stopped_at = limit
        self.seconds = time.perf_counter() - start
        log.info("candidate breaks the %s limit; not measured further", limit)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "recipe": self.recipe, "backend": self.backend, "metric": self.metric,
                "latency": self.latency.to_dict(), "profile": self.profile.to_dict(),
                "speedup": self.speedup.to_dict() if self.speedup else None,
                "speedup_same_runtime": self.speedup_same_runtime.to_dict() if self.speedup_same_runtime else None,
                "emulated": self.emulated}

    def speed_text(self, baseline: "Candidate") -> str:
        """The speedup a reader may quote: timed together with the original, a range when noisy."""
        if self.emulated:
            return "n/a (emulated)"
        if self.speedup is not None:
            return self.speedup.text()
        return f"{baseline.latency.p50_ms / self.latency.p50_ms:.2f}x (timed apart)"

    def row(self, baseline: "Candidate", higher_is_better: bool) -> list[Any]:
        """Report row: score, metric change (candidate - baseline, report.metric_change), MB, size reduction, p50,
        speedup, memory. ``higher_is_better`` is the caller's to state beside the table (report.sign_note)."""
        change = metric_change(self.metric["score"], baseline.metric["score"])
        return [self.name, self.backend, self.metric["score"], change,
                self.profile.artifact_bytes / 1e6, baseline.profile.artifact_bytes / self.profile.artifact_bytes,
                self.latency.p50_ms, self.speed_text(baseline) if self is not baseline else "1.00x",
                self.profile.peak_memory_bytes / 1e6]


ROW_HEADER = ["candidate", "runtime", "metric", METRIC_CHANGE, "artifact MB", "size reduction",
              "latency p50 ms", "speedup", "peak memory MB"]


def measure_candidate(name: str, model: nn.Module, configs: Sequence[BaseConfig], task: Task, *,
                      backend: str = "auto", threads: int | None = None) -> Candidate:
    """Everything a report compares: the full profile of the torch model, latency and metric on its runtime."""
    return measure(name, model, configs, task, backend=backend, threads=threads, full=True)


def measure(name: str, model: nn.Module, configs: Sequence[BaseConfig], task: Task, *, backend: str = "auto",
            threads: int | None = None, target: Target | None = None, early_stop: bool = False,
            full: bool = False) -> Candidate:
    """The one measurer (commands, reports and the search all use it), cheapest measurement first:
    artifact bytes -> (peak memory) -> build on the runtime and time it -> the task metric.

    ``early_stop``: stop at the first of ``target``'s limits the candidate already breaks (the
    metric, usually the slow part, is then not run; ``stopped_at`` names the limit). ``full``: also
    the per-layer profile of the torch model (MACs, breakdown) that reports show.
    """
    start = lap = time.perf_counter()
    target = target or Target(threads=threads)
    c = Candidate(name=name, recipe=[cfg.to_dict() for cfg in configs], backend="", model=model)
    model.eval()
    if full:
        c.profile = profile(model, task.example, device="cpu", threads=threads)
        c.size_mb = c.profile.artifact_bytes / 1e6
        c.params = c.profile.params_total
        lap = c.lap("profile", lap)
    else:
        c.size_mb = artifact_size(model) / 1e6
        c.params = count_params(model)[0]
        lap = c.lap("size", lap)
    if early_stop and _over(c.size_mb, target.max_size_mb):
        return c.stop("size", start)
    if target.max_memory_mb is not None:
        c.memory_mb = peak_memory(model, task.example, device=target.device) / 1e6
        lap = c.lap("memory", lap)
        if early_stop and _over(c.memory_mb, target.max_memory_mb):
            return c.stop("memory", start)
    elif c.profile is not None:
        c.memory_mb = c.profile.peak_memory_bytes / 1e6
    c.backend = resolve_backend(model, backend)
    c.runnable = build(model, backend, task.example, threads=threads)  # "auto" may fall back to torch, logged
    if c.backend != "torch" and isinstance(c.runnable, nn.Module):
        c.backend = "torch"
    c.runtime_skipped = dict(getattr(c.runnable, "skipped", {})) or None
    c.emulated = emulated_reason(model) if c.backend == "torch" else None
    lap = c.lap("build", lap)
    if c.profile is not None and c.runnable is model:
        c.latency = c.profile.latency
    else:
        device = target.device if c.backend == "torch" else "cpu"
        c.latency = measure_latency(c.runnable, task.example, device=device, threads=threads)
        lap = c.lap("latency", lap)
    if early_stop and _over(c.latency.p50_ms, target.max_latency_ms):
        return c.stop("latency", start)
    c.metric = task.evaluate(c.runnable)
    c.lap("metric", lap)
    c.seconds = time.perf_counter() - start
    return c


def emulated_reason(model: nn.Module) -> str | None:
    """Why torch's timing of ``model`` backs no speed claim: layers whose integer math runs as fp32 emulation."""
    layers = [n for n, m in model.named_modules() if getattr(m, "kernel", None) == EMULATED]
    if not layers:
        return None
    return (f"{len(layers)} layer(s) run static int8 as fp32 emulation on torch here (no integer kernel on this "
            "CPU): accuracy is exact, speed is not the deployed one; ONNX Runtime runs them on integer kernels")


def _over(value: float | None, limit: float | None) -> bool:
    return limit is not None and value is not None and value > limit
