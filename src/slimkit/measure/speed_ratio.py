"""Speed ratios a user can trust on a shared machine: contenders timed together, noise detected and said.

A ratio of two timings taken minutes apart measures the machine as much as the models (a busy
moment made an original look 1000x slower than its candidate). Here every contender is timed in
the same alternating rounds (A B C A B C ...), on the same threads, and each round gives one ratio;
the reported ratio is the median of those per-round ratios. When the rounds disagree (coefficient
of variation above ``MAX_CV`` or p95 above ``MAX_TAIL`` x p50) more rounds are run up to a time
cap; if they still disagree the ratio is given as a range and marked noisy.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from slimkit.core.errors import SlimkitError
from slimkit.measure.latency import interleaved_samples

#: Spread beyond which a timing is called noisy: std/mean of the rounds, and p95 over p50.
MAX_CV = 0.20
MAX_TAIL = 3.0
NOISY = "noisy: other work on this machine"
#: Extra rounds on a noisy machine may take this many times the first rounds' time, at most the cap in
#: seconds: a busy machine costs a command a little more, never minutes.
EXTRA_ROUNDS_FACTOR = 2.0
EXTRA_ROUNDS_CAP_S = 5.0


@dataclasses.dataclass(frozen=True)
class Timing:
    """One contender's per-round milliseconds, summarised."""

    p50_ms: float
    p95_ms: float
    cv: float
    rounds: int

    @property
    def noisy(self) -> bool:
        return self.cv > MAX_CV or self.p95_ms > MAX_TAIL * self.p50_ms

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "noisy": self.noisy}


@dataclasses.dataclass(frozen=True)
class SpeedRatio:
    """How many times faster ``candidate`` ran than ``reference`` in the same rounds (> 1 = faster)."""

    reference: str
    candidate: str
    ratio: float   # median of the per-round ratios
    low: float     # 10th percentile of the per-round ratios
    high: float    # 90th percentile
    noisy: bool
    load: float    # 1-minute load average per core while timing (0 where the OS does not say)

    def text(self) -> str:
        """``3.51x``, or ``2.90-4.12x (noisy: other work on this machine)``."""
        if self.noisy:
            return f"{self.low:.2f}-{self.high:.2f}x ({NOISY})"
        return f"{self.ratio:.2f}x"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SpeedComparison:
    """Every contender's timing and the rounds they shared."""

    timings: dict[str, Timing]
    samples: dict[str, list[float]]
    load: float

    def ratio(self, reference: str, candidate: str) -> SpeedRatio:
        ref, cand = np.asarray(self.samples[reference]), np.asarray(self.samples[candidate])
        per_round = ref / np.maximum(cand, 1e-9)  # (rounds,)
        low, mid, high = np.percentile(per_round, [10, 50, 90])
        noisy = self.timings[reference].noisy or self.timings[candidate].noisy
        return SpeedRatio(reference, candidate, float(mid), float(low), float(high), noisy, self.load)

    def to_dict(self) -> dict[str, Any]:
        return {"timings": {k: t.to_dict() for k, t in self.timings.items()}, "load_per_core": self.load,
                "how": "contenders timed in alternating rounds on the same threads; ratio = median per-round ratio"}


def load_per_core() -> float:
    """The 1-minute load average over the core count (about 1.0 = every core busy)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


def timing_of(samples: list[float]) -> Timing:
    t = np.asarray(samples, dtype=np.float64)
    p50, p95 = np.percentile(t, [50, 95])
    mean = float(t.mean())
    return Timing(float(p50), float(max(p95, p50)), float(t.std() / mean) if mean > 0 else 0.0, len(t))


def compare_speed(contenders: Mapping[str, Callable[[], Any]], *, rounds: int = 7, min_time_s: float = 0.02,
                  max_seconds: float | None = None, clock: Callable[[], float] = time.perf_counter,
                  load: Callable[[], float] = load_per_core) -> SpeedComparison:
    """Time every contender in alternating rounds; while any is noisy, add rounds until ``max_seconds`` have
    passed in all (default: ``EXTRA_ROUNDS_FACTOR`` x the first rounds' time, capped at ``EXTRA_ROUNDS_CAP_S``).

    ``clock`` and ``load`` are injectable so the noise rules can be tested with exact, fake timings.
    """
    if len(contenders) < 2:
        raise SlimkitError("a speed comparison needs at least two contenders", "pass the original and a candidate")
    if rounds < 3 or min_time_s < 0 or (max_seconds is not None and max_seconds <= 0):
        raise SlimkitError(f"rounds={rounds}, min_time_s={min_time_s}, max_seconds={max_seconds} are invalid",
                           "use rounds >= 3, min_time_s >= 0, max_seconds > 0")
    start = clock()
    samples = interleaved_samples(contenders, rounds=rounds, min_time_s=min_time_s, clock=clock)
    if max_seconds is None:
        max_seconds = min((1 + EXTRA_ROUNDS_FACTOR) * (clock() - start), EXTRA_ROUNDS_CAP_S)
    while any(timing_of(s).noisy for s in samples.values()) and clock() - start < max_seconds:
        more = interleaved_samples(contenders, rounds=rounds, min_time_s=min_time_s, warmup=0, clock=clock)
        for k, extra in more.items():
            samples[k].extend(extra)
    return SpeedComparison({k: timing_of(s) for k, s in samples.items()}, samples, float(load()))


__all__ = ["MAX_CV", "MAX_TAIL", "NOISY", "SpeedComparison", "SpeedRatio", "Timing", "compare_speed", "load_per_core"]
