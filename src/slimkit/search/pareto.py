"""Reading a finished search: the Pareto front, the best feasible candidate, and — when nothing fits —
the closest candidates with each limit's margin and a hint naming what stands in the way."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from slimkit.core.target import Target
from slimkit.search.evaluate import TrialMeasurement


@dataclasses.dataclass
class TrialRecord:
    """One finished trial: its pipeline (the recipe steps), what was measured, the constraint vector."""

    number: int
    recipe: list[dict[str, Any]]
    measured: TrialMeasurement
    constraints: list[float]
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.measured.error is None and all(c <= 0 for c in self.constraints)

    @property
    def evaluated(self) -> bool:
        return self.measured.score is not None

    def label(self) -> str:
        return " + ".join(step["type"].split(".")[-1] for step in self.recipe) or "original"

    def to_dict(self) -> dict[str, Any]:
        return {"number": self.number, "pipeline": self.label(), "recipe": self.recipe, "params": self.params,
                "measured": self.measured.to_dict(), "constraints": self.constraints, "feasible": self.feasible}


def objectives(m: TrialMeasurement) -> tuple[float, float, float]:
    """(drop, MB, ms), all minimized; what was not measured counts as hopeless (1e9)."""
    return tuple(1e9 if v is None else float(v) for v in (m.drop, m.size_mb, m.latency_ms))  # type: ignore[return-value]


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Evaluated candidates no other evaluated candidate beats on every objective at once."""
    pool = [r for r in records if r.evaluated and r.measured.error is None]
    front = []
    for r in pool:
        a = objectives(r.measured)
        if not any(_dominates(objectives(o.measured), a) for o in pool if o is not r):
            front.append(r)
    return sorted(front, key=lambda r: objectives(r.measured)[1])


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pick_best(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The feasible candidate with the best metric; ties go to the smaller, then the faster one.

    The target says what must fit; whatever room is left is spent on quality.
    """
    feasible = [r for r in records if r.feasible and r.evaluated]
    return min(feasible, key=lambda r: objectives(r.measured), default=None)


def margins(record: TrialRecord, target: Target) -> dict[str, float | None]:
    """Each limit's margin: measured - limit (<= 0 fits), None where it was not measured."""
    out: dict[str, float | None] = {}
    for name, value in zip(target.names(), record.constraints):
        out[name] = None if value >= 1e9 or math.isinf(value) else value
    return out


def closest(records: Sequence[TrialRecord], target: Target, k: int = 3) -> list[TrialRecord]:
    """The ``k`` candidates that miss the target by the least (sum of overshoots relative to each limit)."""
    limits = [getattr(target, f"max_{n}") for n in target.names()]

    def miss(r: TrialRecord) -> float:
        total = 0.0
        for c, limit in zip(r.constraints, limits):
            if c > 0:
                total += min(c, 1e9) / max(float(limit), 1e-3)
        return total

    pool = [r for r in records if r.measured.error is None]
    return sorted(pool, key=miss)[:k]


def fixed_overhead_ms(records: Sequence[TrialRecord]) -> float | None:
    """Latency at zero parameters, from a least-squares line through (params, latency) of the candidates."""
    pts = [(r.measured.params, r.measured.latency_ms) for r in records
           if r.measured.params is not None and r.measured.latency_ms is not None]
    if len(pts) < 3 or len({p for p, _ in pts}) < 2:
        return None
    x, y = np.array(pts, dtype=float).T
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(intercept), 0.0) if slope > 0 else float(y.min())


def hints(records: Sequence[TrialRecord], target: Target, baseline: TrialMeasurement) -> list[str]:
    """One sentence per limit that no candidate met, naming the nearest value and what to change."""
    out = []
    measured = [r for r in records if r.measured.error is None]
    if target.max_size_mb is not None:
        sizes = [r.measured.size_mb for r in measured if r.measured.size_mb is not None]
        if sizes and min(sizes) > target.max_size_mb:
            s = min(sizes)
            out.append(f"size: the smallest candidate is {s:.4g} MB > {target.max_size_mb:g} MB "
                       f"({baseline.size_mb / s:.1f}x smaller than the original); allow stronger techniques "
                       "(int4, more pruning) or raise max_size_mb")
    if target.max_latency_ms is not None:
        lats = [r.measured.latency_ms for r in measured if r.measured.latency_ms is not None]
        if lats and min(lats) > target.max_latency_ms:
            fastest = min((r for r in measured if r.measured.latency_ms is not None), key=lambda r: r.measured.latency_ms)
            ratio = baseline.size_mb / fastest.measured.size_mb if fastest.measured.size_mb else 1.0
            overhead = fixed_overhead_ms(measured)
            tail = f"; the runtime's fixed overhead is ~{overhead:.3g} ms" if overhead is not None else ""
            out.append(f"latency: {min(lats):.3g} ms > {target.max_latency_ms:g} ms even at {ratio:.1f}x "
                       f"compression{tail}; measure a smaller batch, more threads, or raise max_latency_ms")
    if target.max_drop is not None:
        others_ok = [r for r in measured if r.evaluated and all(
            c <= 0 for n, c in zip(target.names(), r.constraints) if n != "drop")]
        if others_ok and all(r.measured.drop is not None and r.measured.drop > target.max_drop for r in others_ok):
            best = min(r.measured.drop for r in others_ok)  # type: ignore[type-var]
            out.append(f"quality: the least drop among candidates that fit the other limits is {best:.4g} > "
                       f"{target.max_drop:g}; allow recovery fine-tuning/distillation, more trials, or a looser limit")
    if not out and not any(r.feasible for r in records):
        out.append("no single limit is out of reach, but no candidate met them all at once; run more trials")
    return out
