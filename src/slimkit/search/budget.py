"""How long a search may spend on each part, sized to the model in front of it rather than fixed counts.

A search spends its time in four places: measuring the original, per-layer sensitivity (one metric
run per layer probed), the trials (mostly recovery training) and the end: copying the best the
trials saved and measuring it beside the original for the report. The first is measured; the
others are sized from it so that, on a 1-20 M-parameter model, one trial stays near a minute and
``--time-budget`` bounds the whole command, not only the start of the last trial.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import Technique
from slimkit.core.task import Task
from slimkit.distill.distiller import SEARCH_STEPS as DISTILL_STEPS
from slimkit.prune.reconstruct import RIDGES
from slimkit.quantize.extreme import TERNARY_SEARCH_STEPS
from slimkit.quantize.qat import QAT_SEARCH_STEPS
from slimkit.train.finetune import finetune
from slimkit.train.recover import FINETUNE_STEPS

log = logging.getLogger("slimkit.search")

#: Seconds one training step of a trial (recovery, QAT, ternary) may take when no budget says otherwise.
TRAINING_SECONDS = 25.0
#: Seconds the per-layer sensitivity may take when no budget says otherwise; share of a budget otherwise.
SENSITIVITY_SECONDS, SENSITIVITY_SHARE = 30.0, 0.1
#: Most layers sensitivity probes, and the fewest recovery steps worth offering.
MAX_SENSITIVITY_LAYERS, MIN_STEPS = 12, 10
#: The search's training knobs: extra key -> (technique search name, lengths offered, cost of a step in
#: fine-tuning steps: distillation runs the teacher too, QAT and ternary fake-quantize every weight).
TRAINED = {"finetune_steps": ("finetune", FINETUNE_STEPS, 1.0), "distill_steps": ("distill", DISTILL_STEPS, 1.5),
           "qat_steps": ("qat", QAT_SEARCH_STEPS, 1.5), "ternary_steps": ("ternary", TERNARY_SEARCH_STEPS, 1.5)}
#: Seconds least-squares reconstruction after pruning may take in a trial.
RECONSTRUCTION_SECONDS = 20.0
#: Seconds CP decomposition of a model's convs may take in a trial (ALS sweeps over every kxk kernel).
CP_SECONDS = 20.0
#: The CP ratio the estimate assumes (the middle of what the search offers) and its ALS sweeps at most.
CP_RATIO, CP_SWEEPS = 0.35, 100
#: Runs of the original's measurement the end of a search takes (the report's side-by-side profile of
#: original and best, and their timing together). The best is not rebuilt: the trials saved it.
FINISH_MEASUREMENTS = 3.0
#: Seconds the report takes beyond its measurements, whatever the model: importing and drawing its
#: plots, counting MACs, writing HTML (5-13 s seen on digits with 2 busy cores; fewer when imported already).
REPORT_SECONDS = 10.0


class TimeBudget:
    """Seconds left of a search's budget (``None``: unbounded), counted from ``start`` (a ``time.monotonic()``
    reading: when the command started, so loading the task counts too), else from its creation."""

    def __init__(self, seconds: float | None, start: float | None = None) -> None:
        if seconds is not None and not seconds > 0:
            raise SlimkitError(f"time_budget={seconds!r} is invalid", "give seconds > 0, or leave it out")
        self.seconds, self.start = seconds, time.monotonic() if start is None else start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def share(self, fraction: float, default: float) -> float:
        """``fraction`` of what is left, or ``default`` seconds when unbounded."""
        left = self.left()
        return default if left is None else max(0.0, fraction * left)


def sensitivity_layers(metric_seconds: float, budget: TimeBudget) -> int:
    """How many layers the per-layer sensitivity can probe: one metric run each, within its share."""
    allowed = budget.share(SENSITIVITY_SHARE, SENSITIVITY_SECONDS)
    return min(MAX_SENSITIVITY_LAYERS, int(allowed / max(metric_seconds, 1e-3)))


def training_step_seconds(task: Task, probe_steps: int = 3) -> float:
    """Seconds one recovery-training step takes on this model and data (a few real steps on a copy)."""
    model = copy.deepcopy(task.model).train()
    finetune(model, task, steps=1, progress=False)  # untimed: the first step pays for one-time set-up
    start = time.perf_counter()
    finetune(model, task, steps=probe_steps, progress=False)
    return (time.perf_counter() - start) / probe_steps


def finetune_steps(step_seconds: float, budget: TimeBudget, trials: int,
                   offered: Sequence[int] = FINETUNE_STEPS) -> tuple[int, ...]:
    """The recovery lengths a trial may take: those that fit its training time, else one that does."""
    per_trial = min(TRAINING_SECONDS, budget.share(0.5 / max(1, min(trials, 4)), TRAINING_SECONDS))
    fits = int(per_trial / max(step_seconds, 1e-6))
    steps = tuple(s for s in offered if s <= fits)
    return steps or (max(MIN_STEPS, fits),)


def reconstruction_seconds(model: nn.Module) -> float:
    """About how long reconstruction after channel pruning takes on this machine."""
    return reconstruction_flops(model) / _cholesky_flop_rate()


def reconstruction_flops(model: nn.Module) -> float:
    """Each refit layer solves a (d, d) system per ridge tried on two folds, then once more in float64,
    d being its inputs per output (in_channels / groups x kernel area, + 1). Upper bound: every layer refit."""
    flops = 0.0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            d = m.weight[0].numel() + 1                     # (out, in/groups, *kernel) -> unknowns per output
            out = m.weight.shape[0]
            flops += 2 * len(RIDGES) * (d ** 3 / 3 + 3 * d * d * out) + 2 * (2 * d ** 3 / 3 + 2 * d * d * out)
    return flops


def cp_flops(model: nn.Module, ratio: float = CP_RATIO, sweeps: int = CP_SWEEPS) -> float:
    """CP-ALS on every kxk Conv2d at ``ratio`` of its weights: each sweep computes one MTTKRP per mode
    (2 x weights x rank flops) and the fit's error (2 x weights x rank)."""
    flops = 0.0
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            o, i, kh, kw = m.weight.shape
            rank = max(1, int(ratio * m.weight.numel() / (o + i + kh + kw)))
            flops += sweeps * (4 * 2 + 2) * m.weight.numel() * rank
    return flops


def _cholesky_flop_rate(n: int = 768) -> float:
    """Float32 flop/s of a Cholesky factorization here (the bulk of reconstruction's work)."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    spd = a @ a.T + n * torch.eye(n)                        # (n, n) symmetric positive definite
    torch.linalg.cholesky_ex(spd)
    start = time.perf_counter()
    for _ in range(3):
        torch.linalg.cholesky_ex(spd)
    return 3 * (n ** 3 / 3) / max(time.perf_counter() - start, 1e-9)


def sized_extra(task: Task, techs: Sequence[Technique], extra: dict[str, object], budget: TimeBudget,
                trials: int) -> dict[str, object]:
    """``extra`` with what a trial may spend on this model, unless the caller chose it: training lengths
    (fine-tuning, distillation, QAT, ternary) timed on a few real steps, and whether reconstruction fits."""
    stages = {t.search: t.stage for t in techs}
    sized: dict[str, object] = {}
    if "channels" in stages and "reconstruct" not in extra:
        seconds = reconstruction_seconds(task.model)
        sized["reconstruct"] = seconds <= min(RECONSTRUCTION_SECONDS, budget.share(0.1, RECONSTRUCTION_SECONDS))
        if not sized["reconstruct"]:
            log.info("reconstruction after pruning would take about %.0f s a trial: not offered", seconds)
    if "cp" in stages and "too_slow" not in extra:
        seconds = cp_flops(task.model) / _cholesky_flop_rate()
        if seconds > min(CP_SECONDS, budget.share(0.1, CP_SECONDS)):
            sized["too_slow"] = {"cp": f"CP decomposition of these convs would take about {seconds:.0f} s a trial"}
            log.info("not offered: %s", sized["too_slow"]["cp"])
    wanted = {key: knob for key, knob in TRAINED.items() if knob[0] in stages and key not in extra}
    if wanted and task.train and task.loss is not None:
        try:
            step_s = training_step_seconds(task)
        except SlimkitError as exc:
            log.warning("training steps not sized: %s", exc)
        else:
            for key, (_, offered, cost) in wanted.items():
                sized[key] = list(finetune_steps(step_s * cost, budget, trials, offered))
            log.info("one training step takes %.3f s: lengths offered %s", step_s, sized)
    return {**sized, **extra}


def finish_reserve(original_seconds: float, report: bool = True) -> float:
    """Seconds to keep for the end: copying the saved best, measuring it against the original, the report."""
    return FINISH_MEASUREMENTS * original_seconds + (REPORT_SECONDS if report else 0.0)


def process_start() -> float:
    """When this process started, as a ``time.monotonic()`` reading (Linux: from /proc, so the interpreter's
    start and imports count in a command's budget); elsewhere, now."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")       # field 22: start, seconds after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()
    return time.monotonic() - max(0.0, uptime - started)


def enough_for_another(trial_seconds: Sequence[float], left: float | None, reserve: float) -> bool:
    """Whether another trial as long as the slowest so far still ends before the end's ``reserve``
    (the best is saved by its trial, so the end rebuilds nothing)."""
    if left is None:
        return True
    return left - reserve > max(trial_seconds, default=0.0)
