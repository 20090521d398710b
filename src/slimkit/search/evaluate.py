"""What the search records of one pipeline, measured by the one measurer (``slimkit.pipeline.candidate``).

Order: apply the techniques -> artifact bytes -> (memory) -> build on the runtime and time it ->
the task metric. A candidate that already breaks a hard size / memory / latency limit is
recorded as infeasible without running the metric, which is usually the slow part.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, apply
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_shown
from slimkit.core.record import records_of
from slimkit.core.registry import technique_of
from slimkit.core.target import Measurement, Target
from slimkit.core.task import Task
from slimkit.measure import artifact_size, count_params
from slimkit.measure.speed_ratio import compare_speed
from slimkit.pipeline.candidate import measure
from slimkit.prune.record import ChannelRecord
from slimkit.runtime import build
from slimkit.search.latency_check import check_latency, has_latency_limit

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
    timings: dict[str, float] | None = None  # where the trial's time went: technique steps, then measuring phases
    latency_check: dict[str, Any] | None = None  # re-timed with the original (``search.latency_check``)

    def measurement(self) -> Measurement:
        return Measurement(size_mb=self.size_mb, latency_ms=self.latency_ms, memory_mb=self.memory_mb,
                           drop=self.drop)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def failure_reason(step: str, exc: Exception) -> str:
    """One line for a candidate that failed: where, and why (an error the user can act on as it
    reads; anything else with its type, as a bug to report)."""
    if isinstance(exc, SlimkitError):
        return f"{step}: {exc}"
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{step}: {type(exc).__name__}: {line} (a bug: please report it)"


#: ``measure(configs, early_stop=True) -> (measurement, model or None)``: the optimizer's only view of
#: the world. ``early_stop=False`` measures everything even past a limit (the original model).
Measurer = Callable[..., "tuple[TrialMeasurement, nn.Module | None]"]


class RuntimeMeasurer:
    """The search's view of :func:`slimkit.pipeline.candidate.measure`: techniques applied to the
    task's model, measured on the target's runtime, stopping at the first broken limit."""

    def __init__(self, task: Task, target: Target, baseline_score: float | None = None, *, backend: str = "auto",
                 seed: int = 0) -> None:
        self.task, self.target, self.backend, self.seed = task, target, backend, seed
        self.baseline_score = baseline_score
        #: the target as the user gave it ("no slower than the original" not yet turned into ms)
        self.asked: Target | None = None
        self._original: Any = None  # the original's runnable, for re-timing candidates beside it
        self.compare_speed = compare_speed  # injectable: the re-timing verdicts are tested with exact timings
        #: the float model the last call's final quantization step started from (the report compares with it)
        self.before_last: nn.Module | None = None

    def __call__(self, configs: Sequence[BaseConfig], early_stop: bool = True,
                 ) -> tuple[TrialMeasurement, nn.Module | None]:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        step = "copying the model"
        self.before_last = None
        try:
            torch.manual_seed(self.seed)
            model = copy.deepcopy(self.task.model)
            for i, config in enumerate(configs):  # one step at a time, each timed (as apply() runs them)
                if early_stop and technique_of(type(config)).stage == "recover" and \
                        not any(technique_of(type(c)).stage == "recover" for c in configs[:i]):
                    lap, step = time.perf_counter(), "checks before training"
                    before = self._before_training(model, configs[i:])
                    timings[step] = time.perf_counter() - lap
                    if before is not None:
                        before.seconds, before.timings = time.perf_counter() - start, timings
                        return before, None
                if i == len(configs) - 1 and technique_of(type(config)).stage == "quantize":
                    self.before_last = self.task.model if i == 0 else copy.deepcopy(model)
                lap, step = time.perf_counter(), config.type_name
                with progress_shown(False):  # the search's own bar says which trial runs; its steps stay quiet
                    model = apply(model, config, self.task, inplace=True)
                timings[config.type_name] = timings.get(config.type_name, 0.0) + time.perf_counter() - lap
            step = "measuring (size, runtime build, latency, metric)"
            c = measure("trial", model, configs, self.task, backend=self.backend, threads=self.target.threads,
                        target=self.target, early_stop=early_stop)
        except Exception as exc:  # noqa: BLE001 - one pipeline's failure must not end the search: recorded, logged
            if not isinstance(exc, SlimkitError):
                log.exception("trial failed in %s: %s", step, [c.type_name for c in configs])
            return TrialMeasurement(error=failure_reason(step, exc), seconds=time.perf_counter() - start,
                                    timings=timings), None
        m = TrialMeasurement(size_mb=c.size_mb, params=c.params, memory_mb=c.memory_mb, backend=c.backend or None,
                             stopped_at=c.stopped_at, runtime_skipped=c.runtime_skipped,
                             seconds=time.perf_counter() - start, timings={**timings, **c.timings})
        if c.latency is not None:
            m.latency_ms, m.latency_p95_ms = c.latency.p50_ms, c.latency.p95_ms
        if c.metric is not None:
            m.score = c.metric["score"]
            if self.baseline_score is not None:
                m.drop = self.task.drop(self.baseline_score, m.score)
        if not configs:
            self._original = c.runnable
        elif early_stop and m.score is not None and has_latency_limit(self.target) and \
                self.target.feasible(m.measurement()):
            lap = time.perf_counter()
            m.latency_check = self._retimed(c.runnable)
            m.timings = {**(m.timings or {}), "re-timing with the original": time.perf_counter() - lap}
            m.seconds = time.perf_counter() - start
        return m, model

    def _retimed(self, runnable: Any) -> dict[str, Any] | None:
        """The candidate and the original timed together (``search.latency_check``); None if that failed."""
        example, asked = self.task.example, self.asked or self.target
        try:
            if self._original is None:  # a resumed study or a worker: the original was measured elsewhere
                self._original = build(self.task.model, self.backend, example, threads=self.target.threads)
            original = self._original
            return check_latency(lambda: original(*example), lambda: runnable(*example), asked,
                                 compare=self.compare_speed).to_dict()
        except Exception:  # noqa: BLE001 - the trial keeps its own timing; the end of the run re-times the best
            log.exception("re-timing a candidate with the original failed")
            return None

    def _before_training(self, untrained: nn.Module, rest: Sequence[BaseConfig]) -> TrialMeasurement | None:
        """What is known before any recovery training: the bytes (training does not change them) and
        whether pruning removed anything. A pipeline already out of the size limit, or whose pruning
        step removed nothing, ends here with the reason instead of after minutes of fine-tuning.
        ``untrained``: the model after the steps before training; ``rest``: the steps from training on."""
        for record in records_of(untrained):
            if isinstance(record, ChannelRecord) and record.groups_pruned == 0:
                why = next(iter(record.skipped.values()), "no group could be pruned")
                return TrialMeasurement(error=f"{record.technique} removed nothing ({why})")
        after = [c for c in rest if technique_of(type(c)).stage != "recover"]  # e.g. the quantization that follows
        if self.target.max_size_mb is None or any(getattr(c, "steps", 0) for c in after):
            return None  # no size limit, or finding the bytes would train (QAT, ternary): not known before
        with progress_shown(False):
            final = apply(untrained, after, self.task) if after else untrained
        size_mb = artifact_size(final) / 1e6
        if size_mb > self.target.max_size_mb:
            log.info("candidate breaks the size limit before training; not trained")
            return TrialMeasurement(size_mb=size_mb, params=count_params(final)[0], stopped_at="size")
        return None
