"""A candidate model measured the way slimkit compares models: metric, bytes, latency, on its runtime.

Size and per-layer cost come from the torch model (its saved artifact); latency and the metric
come from the runnable built on the backend it deploys to — a quantized model's quality and
speed are never taken from a float or fake-quantized stand-in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch.nn as nn

from slimkit.core.config import BaseConfig
from slimkit.core.task import Task
from slimkit.measure import Latency, Profile, measure_latency, profile
from slimkit.runtime import build, resolve_backend


@dataclasses.dataclass
class Candidate:
    name: str
    recipe: list[dict[str, Any]]
    backend: str
    metric: dict[str, float]
    profile: Profile          # torch model: artifact bytes, params, MACs, per-layer breakdown
    latency: Latency          # the deployed runnable
    model: nn.Module = dataclasses.field(repr=False, default=None)  # type: ignore[assignment]
    runnable: Any = dataclasses.field(repr=False, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "recipe": self.recipe, "backend": self.backend, "metric": self.metric,
                "latency": self.latency.to_dict(), "profile": self.profile.to_dict()}

    def row(self, baseline: "Candidate", higher_is_better: bool) -> list[Any]:
        """Report row: score, quality delta (+ = better), MB, size reduction, p50, speedup, memory."""
        delta = self.metric["score"] - baseline.metric["score"]
        return [self.name, self.backend, self.metric["score"], delta if higher_is_better else -delta,
                self.profile.artifact_bytes / 1e6, baseline.profile.artifact_bytes / self.profile.artifact_bytes,
                self.latency.p50_ms, baseline.latency.p50_ms / self.latency.p50_ms,
                self.profile.peak_memory_bytes / 1e6]


ROW_HEADER = ["candidate", "runtime", "metric", "quality delta", "artifact MB", "size reduction",
              "latency p50 ms", "speedup", "peak memory MB"]


def measure_candidate(name: str, model: nn.Module, configs: Sequence[BaseConfig], task: Task, *,
                      backend: str = "auto", threads: int | None = None) -> Candidate:
    backend = resolve_backend(model, backend)
    runnable = build(model, backend, task.example, threads=threads)
    prof = profile(model, task.example, device="cpu", threads=threads)
    latency = prof.latency if runnable is model else measure_latency(runnable, task.example, threads=threads)
    return Candidate(name=name, recipe=[c.to_dict() for c in configs], backend=backend,
                     metric=task.evaluate(runnable), profile=prof, latency=latency, model=model,
                     runnable=runnable)
