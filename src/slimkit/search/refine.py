"""Step the closest miss toward the target while nothing fits yet.

A sampler needs many trials to learn which way each knob moves bytes, latency and quality; the
direction is known in advance for the knobs that set a technique's strength (more pruning: fewer
bytes, lower quality). So after each trial, while no candidate fits and no queued trial waits,
the candidate that missed by least is stepped one notch: a quality miss (bytes and latency fit)
compresses less and recovers longer; a cost miss (bytes, latency or memory over, quality fine or
not yet measured) compresses more. The sampler still proposes everything else.
"""

from __future__ import annotations

import logging
from typing import Any

from slimkit.search.pareto import TrialRecord, closest

log = logging.getLogger("slimkit.search")

#: knob -> (step, low, high); a positive step compresses more. The bounds are the techniques' ranges.
STRENGTH: dict[str, tuple[float, float, float]] = {
    "channels.amount": (0.05, 0.1, 0.8),
    "channels.macs_ratio": (-0.05, 0.15, 0.9),
    "magnitude.amount": (0.05, 0.3, 0.95),
    "svd.rank_ratio": (-0.05, 0.1, 0.7),
    "tucker.ratio": (-0.05, 0.1, 0.6),
    "cp.ratio": (-0.05, 0.1, 0.6),
    "mixed.budget_ratio": (-0.03, 0.2, 0.5),
}
#: Knobs that buy quality back with training time: on a quality miss, take the longest offered.
RECOVERY = ("finetune.steps", "distill.steps", "qat.steps", "ternary.steps")
COSTS = ("size_mb", "latency_ms", "memory_mb")
#: How far over a limit still counts as a near miss, relative to the limit (drop: 2x over = 3x the limit).
NEAR = {"size_mb": 0.5, "latency_ms": 0.5, "memory_mb": 0.5, "drop": 2.0}


def direction(record: TrialRecord, names: list[str]) -> int:
    """+1 compress more, -1 compress less, 0 when both a cost and quality miss (no clear way)."""
    over = {n for n, c in zip(names, record.constraints) if c > 0}
    quality_known = record.measured.drop is not None
    if over and over <= {"drop"} and quality_known:
        return -1
    if over & set(COSTS) and (not quality_known or "drop" not in over):
        return 1
    return 0


def near(record: TrialRecord, target: Any) -> bool:
    """Whether one notch may be enough: every missed limit is missed by at most ``NEAR`` of itself.
    A far miss (15x over the bytes) is the sampler's job, not a line search's."""
    for name, c in zip(target.names(), record.constraints):
        if 0 < c < 1e9 and c > NEAR[name] * float(getattr(target, f"max_{name}")):  # 1e9+: not measured
            return False
    return True


def neighbour(params: dict[str, Any], step: int, longest: dict[str, Any]) -> dict[str, Any] | None:
    """``params`` one notch stronger (``step`` +1) or gentler (-1); None when no knob can move."""
    new = dict(params)
    for knob, (delta, low, high) in STRENGTH.items():
        if knob in new:
            new[knob] = round(min(high, max(low, float(new[knob]) + step * delta)), 2)
    if step < 0:
        new.update({k: v for k, v in longest.items() if k in new})
    return new if new != params else None


def _longest(study: Any) -> dict[str, Any]:
    """The largest choice of every recovery knob the study has seen."""
    out: dict[str, Any] = {}
    for t in study.get_trials(deepcopy=False):
        for knob in RECOVERY:
            dist = t.distributions.get(knob)
            if dist is not None and hasattr(dist, "choices"):
                out[knob] = max(dist.choices)
    return out


def step_closest(study: Any, target: Any, records: list[TrialRecord]) -> dict[str, Any] | None:
    """Queue the closest miss's neighbour (once); returns its parameters, or None when nothing was queued."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    if any(r.feasible for r in records) or study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return None
    names = target.names()
    for record in closest(records, target, k=3):
        step = direction(record, names) if near(record, target) else 0
        proposal = neighbour(record.params, step, _longest(study)) if step else None
        if proposal is None or any(r.params == proposal for r in records):
            continue
        study.enqueue_trial(proposal, skip_if_exists=True)
        log.info("stepping trial %d %s: %s", record.number, "stronger" if step > 0 else "gentler", proposal)
        return proposal
    return None
