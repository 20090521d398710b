"""What early exits and gated models share: confidence thresholds, their calibration, measurement.

A *routed* model has ``n`` exits (exit heads of one network, or a small and a large model). A
sample leaves at the first exit whose confidence (max softmax probability) is strictly above
that exit's threshold; the last exit takes everything left. Thresholds of 1.0 therefore never
fire (max probability cannot exceed 1), and 0.0 always fires at the first exit.

Calibration picks, exit by exit, the lowest threshold whose routing on held-out data keeps the
accuracy drop against the last exit within ``max_drop`` (a fraction: 0.005 = half a point).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure.latency import median_call_ms

Batches = Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]]


class Routed(nn.Module):
    """Base of models that route samples between exits; subclasses define ``exit_logits`` and ``forward``."""

    def __init__(self, exits: int) -> None:
        super().__init__()
        self.register_buffer("thresholds", torch.ones(exits - 1))  # 1.0: never leave early
        self.last_exits: torch.Tensor | None = None  # exit index of every sample of the last forward

    @property
    def num_exits(self) -> int:
        return int(self.thresholds.numel()) + 1

    def set_thresholds(self, values: Sequence[float]) -> None:
        if len(values) != self.num_exits - 1:
            raise SlimkitError(f"{len(values)} thresholds for {self.num_exits - 1} early exits",
                               "give one threshold per exit except the last")
        if any(not 0.0 <= v <= 1.0 for v in values):
            raise SlimkitError(f"thresholds {list(values)} are outside [0, 1]", "use max-softmax confidences")
        self.thresholds.copy_(torch.tensor([float(v) for v in values]))

    def exit_logits(self, *inputs: torch.Tensor) -> list[torch.Tensor]:  # every exit on every sample
        raise NotImplementedError


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """Max softmax probability per sample: (B, classes) -> (B,)."""
    return logits.softmax(-1).amax(-1)


def simulate(conf: torch.Tensor, correct: torch.Tensor, thresholds: Sequence[float]) -> tuple[torch.Tensor, float]:
    """Exit index per sample and accuracy of the routed model.

    ``conf``: (E-1, N) confidences of the early exits; ``correct``: (E, N) bools for every exit.
    """
    n_early, n = conf.shape
    exit_idx = torch.full((n,), n_early, dtype=torch.long)
    for e in range(n_early - 1, -1, -1):  # the earliest confident exit wins
        exit_idx[conf[e] > thresholds[e]] = e
    acc = correct[exit_idx, torch.arange(n)].float().mean().item()
    return exit_idx, acc


def choose_thresholds(conf: torch.Tensor, correct: torch.Tensor, max_drop: float, grid: int = 200,
                      costs: Sequence[float] | None = None) -> list[float]:
    """Thresholds whose routing loses at most ``max_drop`` accuracy against the last exit.

    Without ``costs``: the lowest threshold per exit, in exit order (the first exits take the whole
    budget). With ``costs`` (what a sample costs when it leaves at exit ``e``, e.g. cumulative
    measured ms): that greedy start, then coordinate descent on the mean cost per sample under the
    same drop, chosen over ~50 budgets for the first exit (greedy after it) and polished by
    coordinate descent, since a later exit that is cheap to reach may spend the budget better.
    """
    if max_drop < 0:
        raise SlimkitError(f"max_drop={max_drop} is negative", "give the accuracy you may lose, e.g. 0.005")
    reference = correct[-1].float().mean().item()
    n_early = conf.shape[0]
    levels = [sorted({round(float(v), 6) for v in torch.quantile(conf[e].double(), torch.linspace(
        0, 1, grid + 1, dtype=torch.float64))} | {1.0}) for e in range(n_early)]

    def feasible(trial: list[float]) -> bool:
        return reference - simulate(conf, correct, trial)[1] <= max_drop + 1e-12

    def greedy(first: list[float]) -> list[float]:
        """Keep ``first``; every later exit at its lowest threshold that still holds the drop."""
        thresholds = first + [1.0] * (n_early - len(first))
        for e in range(len(first), n_early):
            for t in levels[e]:  # ascending: the first that holds exits the most samples
                trial = thresholds.copy()
                trial[e] = t
                if feasible(trial):
                    thresholds[e] = t
                    break
        return thresholds

    thresholds = greedy([])
    if costs is None or n_early < 2:
        return thresholds
    if len(costs) != n_early + 1:
        raise SlimkitError(f"{len(costs)} exit costs for {n_early + 1} exits", "give one cost per exit")
    cost = torch.tensor([float(c) for c in costs], dtype=torch.float64)

    def mean_cost(trial: list[float]) -> float:
        return float(cost[simulate(conf, correct, trial)[0]].mean())

    # how much of the budget the first exit spends decides the rest: try ~50 levels, greedy after it
    firsts = levels[0][:: max(1, len(levels[0]) // 50)] + [thresholds[0]]
    starts = [greedy([t]) for t in firsts]
    thresholds = min((t for t in starts if feasible(t)), key=mean_cost, default=thresholds)
    best = mean_cost(thresholds)
    for _ in range(2):  # coordinate descent polish; each step keeps the drop feasible
        improved = False
        for e in range(n_early):
            for t in levels[e]:
                trial = thresholds.copy()
                trial[e] = t
                exits, acc = simulate(conf, correct, trial)
                mean = float(cost[exits].mean())
                if reference - acc <= max_drop + 1e-12 and mean < best - 1e-12:
                    thresholds, best, improved = trial, mean, True
        if not improved:
            break
    return thresholds


def choose_exit_set(conf: torch.Tensor, correct: torch.Tensor, costs: Sequence[float], max_drop: float,
                    max_exits: int = 2) -> tuple[list[int], list[float], float]:
    """Where to put exits: the subset of candidate positions (at most ``max_exits``) whose calibrated
    routing has the lowest mean cost per sample while losing at most ``max_drop`` accuracy.

    ``conf``: (C, N) confidences of C candidate exits on held-out samples; ``correct``: (C + 1, N),
    the last row the final exit; ``costs``: C + 1 costs of leaving at each (e.g. layers run). Returns
    ``(positions, thresholds, mean cost)``; no exit at all (mean cost = the final's) when none pays.
    """

    n_cand = conf.shape[0]
    if correct.shape[0] != n_cand + 1 or len(costs) != n_cand + 1:
        raise SlimkitError(f"{n_cand} candidate exits need {n_cand + 1} correctness rows and costs, got "
                           f"{correct.shape[0]} and {len(costs)}", "the last row and cost are the final exit's")
    best: tuple[list[int], list[float], float] = ([], [], float(costs[-1]))
    for k in range(1, max(1, max_exits) + 1):
        for subset in combinations(range(n_cand), k):
            rows = list(subset)
            sub_costs = [float(costs[i]) for i in rows] + [float(costs[-1])]
            thresholds = choose_thresholds(conf[rows], correct[rows + [n_cand]], max_drop, costs=sub_costs)
            exits, _ = simulate(conf[rows], correct[rows + [n_cand]], thresholds)
            mean = float(torch.tensor(sub_costs, dtype=torch.float64)[exits].mean())
            if mean < best[2] - 1e-12:
                best = (rows, thresholds, mean)
    return best


@torch.inference_mode()
def exit_outputs(model: Routed, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(E-1, N) confidences and (E, N) correctness of every exit over labelled batches."""
    model.eval()
    confs, corrects = [], []
    for inputs, labels in batches:
        logits = model.exit_logits(*inputs)  # E x (B, classes)
        confs.append(torch.stack([confidence(z) for z in logits[:-1]]))
        corrects.append(torch.stack([z.argmax(-1) == labels for z in logits]))
    if not confs:
        raise SlimkitError("no held-out batches to calibrate on", "give some (inputs, labels) batches")
    return torch.cat(confs, 1), torch.cat(corrects, 1)


def calibrate(model: Routed, batches: Batches, max_drop: float, margin: float = 0.0,
              costs: Sequence[float] | None = None) -> list[float]:
    """Set and return thresholds that keep the drop within ``max_drop - margin`` on ``batches``
    (with ``costs``: the cheapest such routing on average, see :func:`choose_thresholds`)."""
    conf, correct = exit_outputs(model, batches)
    thresholds = choose_thresholds(conf, correct, max(0.0, max_drop - margin), costs=costs)
    model.set_thresholds(thresholds)
    return thresholds


@torch.inference_mode()
def evaluate_routed(model: Any, batches: Batches, *, per_sample: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Accuracy, exit distribution and latency (see :func:`latency_over`) of the routed model."""
    model.eval()  # also an OrtEarlyExit: anything with thresholds, num_exits and last_exits
    correct = total = 0
    counts = torch.zeros(model.num_exits, dtype=torch.long)
    for inputs, labels in batches:
        logits = model(*inputs)
        counts += torch.bincount(model.last_exits, minlength=model.num_exits)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    return {"accuracy": correct / total, "exit_fraction": (counts.double() / total).tolist(),
            "thresholds": model.thresholds.tolist(), **latency_over(model, batches, per_sample=per_sample, repeats=repeats)}


@torch.inference_mode()
def latency_over(fn: Any, batches: Batches, *, per_sample: int = 0, repeats: int = 3) -> dict[str, float]:
    """Latency of ``fn`` over an eval set: every batch timed ``repeats`` times (median per batch; mean
    and p95 over batches), and with ``per_sample`` > 0 that many samples one at a time (batch 1)."""
    batch_ms = [median_call_ms(lambda: fn(*inputs), repeats) for inputs, _ in batches]
    out = {"batch_mean_ms": float(np.mean(batch_ms)), "batch_p95_ms": float(np.percentile(batch_ms, 95)),
           "batches": len(batch_ms)}
    if per_sample:
        xs = torch.cat([b[0][0] for b in batches])[:per_sample]  # (N, ...) first input of every batch
        single_ms = [median_call_ms(lambda: fn(xs[i:i + 1]), 1) for i in range(xs.shape[0])]
        out |= {"sample_mean_ms": float(np.mean(single_ms)), "sample_p95_ms": float(np.percentile(single_ms, 95)),
                "samples": len(single_ms)}
    return out
