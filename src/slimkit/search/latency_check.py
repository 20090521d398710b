"""A trial meets a latency limit only by a timing taken together with the original.

A trial is timed alone, often minutes after the search's first timing of the original; on a shared
machine the two can differ by more than the margin a limit is about (a busy moment once made the
original look 1000x slower, and "no slower than the original" constrained nothing). So a candidate
that meets every limit in its own timing is timed again in the same rounds as the original, on the
same threads, and the latency limit is judged on that comparison: the candidate's p50 against the
user's limit in ms and, for "no slower than the original", against the original timed in those rounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from slimkit.core.target import Target
from slimkit.measure._call import pinned_threads
from slimkit.measure.speed_ratio import NOISY, SpeedComparison, compare_speed

ORIGINAL, CANDIDATE = "original", "candidate"


@dataclasses.dataclass(frozen=True)
class LatencyCheck:
    """The candidate and the original timed in the same rounds, and the limit that applies to it."""

    original_ms: float    # p50 of the original in these rounds
    candidate_ms: float   # p50 of the candidate in these rounds
    limit_ms: float       # the tighter of the user's ms limit and the relative limit x original_ms
    noisy: bool

    @property
    def met(self) -> bool:
        return self.candidate_ms <= self.limit_ms

    def text(self) -> str:
        verdict = "met" if self.met else "not met"
        return (f"re-timed together with the original ({self.original_ms:.3g} ms p50): {self.candidate_ms:.3g} ms "
                f"p50 against a limit of {self.limit_ms:.3g} ms, {verdict}" + (f" ({NOISY})" if self.noisy else ""))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "met": self.met, "text": self.text()}


def has_latency_limit(target: Target) -> bool:
    return target.max_latency_ms is not None or target.max_latency_vs_original is not None


def latency_limit(asked: Target, original_ms: float) -> float:
    """The latency limit in ms with the original at ``original_ms``: the tighter of the two kinds."""
    limit = asked.with_original_latency(original_ms).max_latency_ms
    return float("inf") if limit is None else float(limit)


def check_latency(original: Callable[[], Any], candidate: Callable[[], Any], asked: Target, *,
                  compare: Callable[..., SpeedComparison] = compare_speed) -> LatencyCheck:
    """Time ``original()`` and ``candidate()`` in alternating rounds on the target's threads and judge
    the candidate against ``asked`` (the target as the user gave it: relative limits not yet in ms).
    ``compare`` is injectable so the verdicts can be tested with exact, fake timings."""
    with pinned_threads(asked.threads), torch.inference_mode():
        timed = compare({ORIGINAL: original, CANDIDATE: candidate})
    orig, cand = timed.timings[ORIGINAL], timed.timings[CANDIDATE]
    return LatencyCheck(orig.p50_ms, cand.p50_ms, latency_limit(asked, orig.p50_ms), orig.noisy or cand.noisy)


def latency_constraint(target: Target, constraints: list[float], check: dict[str, Any] | None) -> list[float]:
    """``constraints`` (``target.names()`` order) with the latency entry taken from ``check`` when the
    trial was re-timed with the original: ``candidate_ms - limit_ms`` (<= 0 is met)."""
    if check is None or "latency_ms" not in target.names():
        return constraints
    out = list(constraints)
    out[target.names().index("latency_ms")] = float(check["candidate_ms"]) - float(check["limit_ms"])
    return out


__all__ = ["LatencyCheck", "check_latency", "has_latency_limit", "latency_constraint", "latency_limit"]
