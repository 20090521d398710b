"""Measure one pipeline the way the target judges it, cheapest measurement first.

Order: apply the techniques -> artifact bytes -> (memory) -> build on the runtime and time it ->
the task metric. A candidate that already breaks a hard size / memory / latency limit is
recorded as infeasible without running the metric, which is usually the slow part.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, apply
from slimkit.core.errors import SlimkitError
from slimkit.core.target import Measurement, Target
from slimkit.measure import artifact_size, count_params, measure_latency, peak_memory
from slimkit.runtime import build, resolve_backend

log = logging.getLogger("slimkit.search")


@dataclasses.dataclass
class TrialMeasurement:
    """What was measured of one candidate; ``None`` = not measured because an earlier limit broke."""

    size_mb: float | None = None
    params: int | None = None
    memory_mb: float | None = None
    latency_ms: float | None = None
    latency_p95_ms: float | None = None
    score: float | None = None
    drop: float | None = None
    backend: str | None = None
    stopped_at: str | None = None     # the limit that ended measuring early ("size", "memory", "latency")
    error: str | None = None          # a technique refused this combination (one line)
    runtime_skipped: dict[str, str] | None = None  # layers the runtime kept in float, with its reason
    seconds: float = 0.0

    def measurement(self) -> Measurement:
        return Measurement(size_mb=self.size_mb, latency_ms=self.latency_ms, memory_mb=self.memory_mb,
                           drop=self.drop)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: ``measure(configs, early_stop=True) -> (measurement, model or None)``: the optimizer's only view of
#: the world. ``early_stop=False`` measures everything even past a limit (the original model).
Measurer = Callable[..., "tuple[TrialMeasurement, nn.Module | None]"]


class RuntimeMeasurer:
    """The real measurer: techniques applied to the task's model, timed on the target's runtime."""

    def __init__(self, task: Any, target: Target, baseline_score: float | None = None, *, backend: str = "auto",
                 seed: int = 0) -> None:
        self.task, self.target, self.backend, self.seed = task, target, backend, seed
        self.baseline_score = baseline_score

    def __call__(self, configs: Sequence[BaseConfig], early_stop: bool = True,
                 ) -> tuple[TrialMeasurement, nn.Module | None]:

        start = time.perf_counter()
        m = TrialMeasurement()
        target, task = self.target, self.task
        try:
            torch.manual_seed(self.seed)
            model = apply(task.model, list(configs), task)
        except SlimkitError as exc:
            m.error = str(exc)
            m.seconds = time.perf_counter() - start
            return m, None
        model.eval()
        m.size_mb = artifact_size(model) / 1e6
        m.params = count_params(model)[0]
        if early_stop and _over(m.size_mb, target.max_size_mb):
            return self._stop(m, "size", start), model
        if target.max_memory_mb is not None:
            m.memory_mb = peak_memory(model, task.example, device=target.device) / 1e6
            if early_stop and _over(m.memory_mb, target.max_memory_mb):
                return self._stop(m, "memory", start), model
        m.backend = resolve_backend(model, self.backend)
        runnable = build(model, m.backend, task.example, threads=target.threads)
        m.runtime_skipped = dict(getattr(runnable, "skipped", {})) or None
        device = target.device if m.backend == "torch" else "cpu"
        latency = measure_latency(runnable, task.example, device=device, threads=target.threads)
        m.latency_ms, m.latency_p95_ms = latency.p50_ms, latency.p95_ms
        if early_stop and _over(m.latency_ms, target.max_latency_ms):
            return self._stop(m, "latency", start), model
        m.score = task.evaluate(runnable)["score"]
        if self.baseline_score is not None:
            m.drop = task.drop(self.baseline_score, m.score)
        m.seconds = time.perf_counter() - start
        return m, model

    @staticmethod
    def _stop(m: TrialMeasurement, limit: str, start: float) -> TrialMeasurement:
        m.stopped_at = limit
        m.seconds = time.perf_counter() - start
        log.info("candidate breaks the %s limit; metric not evaluated", limit)
        return m


def _over(value: float | None, limit: float | None) -> bool:
    return limit is not None and value is not None and value > limit
