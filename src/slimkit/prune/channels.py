"""Structured pruning: remove whole channels, neurons and attention heads so the model really shrinks.

Channels are removed per dependency group (``slimkit.graph``), so residual additions, depthwise
convs, BatchNorm and q/k/v stay consistent. After every group the forward pass is checked; a group
whose removal breaks it (a pattern the tracer misreads) is restored and listed, never a crash.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from typing import Any, ClassVar

import torch
import torch.nn as nn

from slimkit.core.config import technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.core.time_limit import time_limit
from slimkit.graph import attention, dependency
from slimkit.measure.flops import count_flops
from slimkit.measure.latency_table import LatencyTable, measure_table
from slimkit.prune.channels_allocation import allocated_ratios
from slimkit.prune.channels_importance import group_importance
from slimkit.prune.group_check import GroupCheck, check_inputs, first_line, runs_as_before, shapes
from slimkit.prune.reconstruct import reconstruct
from slimkit.prune.recurrent_hidden import prune_recurrent
from slimkit.prune.record import ChannelRecord, PruneConfig

log = logging.getLogger("slimkit.prune")

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "random")
ALLOCATIONS = ("uniform", "macs", "latency")
_MAX_RESTARTS = 32
TRACE_SECONDS = 120.0  # building the dependency groups; the tracer can loop on graphs it does not know (Llama)


@technique("prune.Channels", stage="prune", search="channels")
@dataclasses.dataclass(frozen=True)
class Channels(PruneConfig):
    """Remove ``amount`` of the channels of every prunable group (or reach ``macs_ratio``).

    ``importance``: l1 / l2 weight magnitude, bn_scale (|gamma| of the group's BatchNorms),
    taylor (|w * dL/dw| on the task's training batches), random (a control).
    ``round_to``: keep channel counts multiples of this (default 8: CPU conv/GEMM kernels are
    blocked by 8 or 16 channels, and odd widths waste the speedup; None for exact amounts). With
    ``macs_ratio``, the result lands within ``MACS_TOLERANCE`` (0.03) of the ratio: where rounded
    counts cannot, they are left unrounded, and the log says so.
    ``heads``: prune whole attention heads; ``hidden``: also prune a transformer's hidden width.
    ``allocation``: ``uniform`` removes the same fraction of every group; ``macs`` spends the
    budget where the MACs are (``slimkit.prune.channels_allocation``): fewest importance lost per
    MAC saved, so cheap layers (a classifier's hidden units) keep their width. ``latency`` times
    every layer on this machine at a grid of widths first (``slimkit.measure.latency_table``, at
    ``latency_batch``, the example repeated; None keeps the example's batch) and spends the
    budget per millisecond saved instead, so the model at the MACs target is faster. With
    ``macs`` or ``latency``, ``amount`` is the fraction of MACs to remove; convs and MLPs only
    (not attention heads).
    ``reconstruct``: after pruning, refit every Conv2d/Linear that lost input channels so its
    output on the task's calibration inputs matches the unpruned layer's
    (``slimkit.prune.reconstruct``: least squares, no gradient steps); a better start for
    fine-tuning, and the difference between a usable and a broken model without one.
    """

    version: ClassVar[int] = 1
    amount: float = 0.5
    macs_ratio: float | None = None
    importance: str = "l2"
    scope: str = "layer"
    round_to: int | None = 8
    heads: bool = True
    hidden: bool = False
    ignored: tuple[str, ...] = ()
    taylor_batches: int = 8
    seed: int = 0
    allocation: str = "uniform"
    reconstruct: bool = False
    latency_batch: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.amount < 1.0:
            raise SlimkitError(f"prune.Channels amount={self.amount} is outside [0, 1)",
                               "give the fraction of channels to remove, e.g. 0.5")
        if self.macs_ratio is not None and not 0.0 < self.macs_ratio <= 1.0:
            raise SlimkitError(f"prune.Channels macs_ratio={self.macs_ratio} is outside (0, 1]",
                               "give the MACs to keep as a fraction, e.g. 0.5")
        if self.importance not in IMPORTANCES:
            raise SlimkitError(f"unknown importance {self.importance!r}", f"use one of {', '.join(IMPORTANCES)}")
        if self.scope not in ("layer", "global"):
            raise SlimkitError(f"unknown scope {self.scope!r}", "use 'layer' or 'global'")
        if self.allocation not in ALLOCATIONS:
            raise SlimkitError(f"unknown allocation {self.allocation!r}", f"use one of {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.scope == "global":
            raise SlimkitError(f"allocation={self.allocation!r} already ranks channels across layers; "
                               "scope='global' conflicts", f"use scope='layer' with allocation={self.allocation!r}")
        if self.latency_batch is not None and self.latency_batch < 1:
            raise SlimkitError(f"latency_batch={self.latency_batch} must be a positive batch size",
                               "use e.g. 8, or None for the example's own batch")
        if self.round_to is not None and self.round_to < 1:
            raise SlimkitError(f"round_to={self.round_to} must be a positive integer", "use e.g. 8, or None")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return prune_channels(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Channels:
        """By MACs (latency) or by width (bytes: a pruned layer loses params in both dimensions, while
        a MACs target may cut early convs whose params are few). Reconstruction whenever the task has
        calibration inputs and it fits a trial's time (``ctx.extra["reconstruct"]``, sized by the search): it
        turns a broken pruned model into a usable one before any fine-tuning."""
        importances = ["l2", "taylor"] if ctx.trainable else ["l2", "l1"]
        reconstruct = ctx.has_calibration() and bool(ctx.extra.get("reconstruct", True))
        if trial.suggest_categorical("channels.by", ["macs", "width"]) == "width":
            amount = round(trial.suggest_float("channels.amount", 0.1, 0.8, step=0.05), 2)
            return cls(amount=amount, importance=trial.suggest_categorical("channels.importance", importances),
                       reconstruct=reconstruct)
        return cls(macs_ratio=round(trial.suggest_float("channels.macs_ratio", 0.15, 0.9, step=0.05), 2),
                   importance=trial.suggest_categorical("channels.importance", importances), reconstruct=reconstruct)


@dataclasses.dataclass
class _Attempt:
    failed_root: str | None = None
    error: str = ""
    untraceable: dict[str, str] = dataclasses.field(default_factory=dict)  # roots the tracer cannot map
    pruned_groups: int = 0
    blocked: dict[str, str] = dataclasses.field(default_factory=dict)
    kept_out: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # layer -> original output channels kept
    heads: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # attention block -> heads removed
    recurrent: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # LSTM/GRU -> hidden units kept


def prune_channels(model: nn.Module, config: Channels, task: Task | None) -> nn.Module:
    """Handler of :class:`Channels`: prune ``model`` (a copy made by ``apply``) and record what was done."""
    example = _example(task)
    model.eval()
    before_macs = count_flops(model, example).macs
    before_params = sum(p.numel() for p in model.parameters())
    before_widths = dependency.layer_widths(model)
    calib = list(getattr(task, "calib", ()) or ())
    if config.reconstruct and not calib:  # before any work: pruning without it would be thrown away
        raise SlimkitError("prune.Channels reconstruct=True needs calibration inputs and the task has none",
                           "give the Task calib=[(inputs,), ...] batches, or set reconstruct=False")
    original = copy.deepcopy(model) if config.reconstruct else None
    table = measure_table(model, example, batch=config.latency_batch) if config.allocation == "latency" else None
    if config.macs_ratio is None:
        amount = config.amount
        model, attempt, broken = _prune_at(model, config, amount, example, task, {}, table)
    else:
        model, attempt, broken, amount = _prune_to_macs(model, config, example, task, before_macs, table)
    after_macs = count_flops(model, example).macs
    fits, not_refitted = reconstruct(original, model, attempt.kept_out, calib) if original is not None else ({}, {})
    skipped = {**dependency.kept_layers(model), **attempt.blocked, **broken, **not_refitted}
    for name in attempt.recurrent:  # its hidden size was pruned (the channels it reads are kept)
        skipped.pop(name, None)
    for name, reason in skipped.items():
        log.info("prune: left %s intact: %s", name, reason)
    add_record(model, ChannelRecord(
        config.type_name, config.to_dict(), skipped, amount=amount, macs=[before_macs, after_macs],
        params=[before_params, sum(p.numel() for p in model.parameters())],
        layers={n: [before_widths[n], w] for n, w in dependency.layer_widths(model).items()
                if before_widths.get(n) != w},
        heads={n: list(v) for n, v in attempt.heads.items()}, groups_pruned=attempt.pruned_groups,
        reconstruction={n: dataclasses.asdict(f) for n, f in fits.items()},
        latency_table=table.to_dict() if table is not None else None))
    if after_macs != before_macs or attempt.pruned_groups:  # widths now differ from the builder's
        model.slimkit_resized = True
    return model


#: How far from the asked MACs ratio a result may land (fraction of the original MACs).
MACS_TOLERANCE = 0.03


@dataclasses.dataclass
class _Tried:
    """One pruned candidate of the MACs search."""

    macs: int
    model: nn.Module
    attempt: _Attempt
    amount: float


def _prune_to_macs(model: nn.Module, config: Channels, example: tuple, task: Task,
                   before_macs: int, table: LatencyTable | None) -> tuple[nn.Module, _Attempt, dict[str, str], float]:
    """Prune to ``macs_ratio`` of the MACs, within ``MACS_TOLERANCE``: the closest result at most the
    budget, else the closest just over it. An allocation (``macs``/``latency``) aims at the budget
    itself: its one pass is kept when it lands in the window; otherwise the per-group amount is
    bisected, and again without rounding to ``round_to`` when rounded counts move in too coarse steps."""
    target, tolerance = config.macs_ratio * before_macs, MACS_TOLERANCE * before_macs
    broken: dict[str, str] = {}
    if config.allocation != "uniform":
        amount = 1.0 - config.macs_ratio
        candidate, attempt, broken = _prune_at(copy.deepcopy(model), config, amount, example, task, broken, table)
        macs = count_flops(candidate, example).macs
        if target - tolerance <= macs <= target:
            return candidate, attempt, broken, amount
    tried, broken = _bisect(model, config, example, task, target, broken, table)
    if config.round_to is not None and not any(abs(t.macs - target) <= tolerance for t in tried):
        log.info("prune: channel counts in multiples of %d miss %.2f of the MACs; searching without rounding",
                 config.round_to, config.macs_ratio)
        finer, broken = _bisect(model, dataclasses.replace(config, round_to=None), example, task, target, broken,
                                table)
        tried += finer
    under = [t for t in tried if t.macs <= target]
    best = max(under, key=lambda t: t.macs) if under else None
    over = [t for t in tried if target < t.macs <= target + tolerance]
    if over and (best is None or target - best.macs > tolerance):
        best = min(over, key=lambda t: t.macs)
    if best is None:
        lowest = min(t.macs for t in tried)
        raise SlimkitError(f"channel pruning cannot reach {config.macs_ratio:.2f} of the MACs "
                           f"(the least it reached is {lowest / before_macs:.3f}: the rest sits in layers that "
                           f"cannot be pruned)", "ask for a larger macs_ratio, or allow hidden=True / fewer ignored layers")
    if abs(best.macs - target) > tolerance:
        log.warning("prune: reached %.3f of the MACs for %.2f asked: the prunable groups are too coarse to land "
                    "closer", best.macs / before_macs, config.macs_ratio)
    return best.model, best.attempt, broken, best.amount


def _bisect(model: nn.Module, config: Channels, example: tuple, task: Task, target: float,
            broken: dict[str, str], table: LatencyTable | None) -> tuple[list[_Tried], dict[str, str]]:
    """Bisect the per-group amount towards ``target`` MACs: the candidates closest below and above it.
    The first try is where MACs ~ (1 - amount)^2 puts the target (a conv loses inputs and outputs); a
    try inside the tolerance below the target ends the search (each try prunes the whole model)."""
    before = count_flops(model, example).macs
    lo, hi = 0.0, 0.95
    below: _Tried | None = None
    above: _Tried | None = None
    for step in range(10):
        if step == 9 and below is not None:
            break
        mid = (min(hi, max(0.05, 1.0 - (target / max(before, 1)) ** 0.5)) if step == 0
               else (lo + hi) / 2 if step < 9 else 0.95)  # nine bisection steps, then the largest amount if none fit
        candidate, attempt, broken = _prune_at(copy.deepcopy(model), config, mid, example, task, broken, table)
        tried = _Tried(count_flops(candidate, example).macs, candidate, attempt, mid)
        if tried.macs <= target:
            hi = mid
            below = tried if below is None or tried.macs > below.macs else below
            if target - tried.macs <= MACS_TOLERANCE * before:
                break
        else:
            lo = mid
            above = tried if above is None or tried.macs < above.macs else above
    return [t for t in (below, above) if t is not None], broken


def _prune_at(model: nn.Module, config: Channels, amount: float, example: tuple, task: Task,
              broken: dict[str, str], table: LatencyTable | None = None) -> tuple[nn.Module, _Attempt, dict[str, str]]:
    """Prune at ``amount``; restart without a group whenever removing it breaks the forward pass."""
    broken = dict(broken)
    pristine = copy.deepcopy(model)
    for _ in range(_MAX_RESTARTS):
        attempt = _attempt(model, config, amount, example, task, broken, table)
        if attempt.failed_root is None and not attempt.untraceable:
            return model, attempt, broken
        broken.update(attempt.untraceable)
        if attempt.failed_root is not None:
            broken[attempt.failed_root] = attempt.error
        log.info("prune: groups restored: %s", {k: broken[k] for k in [*attempt.untraceable, attempt.failed_root] if k})
        model = copy.deepcopy(pristine)
    raise SlimkitError(f"more than {_MAX_RESTARTS} dependency groups break the forward pass when pruned",
                       "list the custom blocks in ignored=... or report the architecture")


def _attempt(model: nn.Module, config: Channels, amount: float, example: tuple, task: Task,
             broken: dict[str, str], table: LatencyTable | None = None) -> _Attempt:
    with torch.no_grad():
        reference = shapes(model(*example))
    names = dependency.module_names(model)
    kept = dependency.kept_layers(model)
    frozen = dependency.frozen_ids(model, kept)
    blocks = attention.attention_blocks(model)
    ignored_names = set(dependency.resolve_names(model, config.ignored)) | set(broken)
    out = dependency.output_layer(model, example)
    if out is not None:
        ignored_names.add(out)
    ignored = [model.get_submodule(n) for n in sorted(ignored_names | set(kept))]
    num_heads: dict[nn.Module, int] = {}
    heads_kept: dict[str, str] = {}
    for block in blocks:
        if block.frozen_reason or not config.heads:
            ignored.extend(block.qkv)
            if block.frozen_reason:
                heads_kept[block.name] = f"heads kept: {block.frozen_reason}"
        else:
            num_heads.update({layer: block.heads for layer in block.qkv})

    torch.manual_seed(config.seed)
    importance = group_importance(config.importance, model, task, config.taylor_batches)
    result = _Attempt(blocked=heads_kept)
    with warnings.catch_warnings():  # loose parameters (ViT class token...) are sliced on their last axis, as meant
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        try:
            pruner = _pruner(model, example, importance, config, amount, ignored, num_heads)
        except SlimkitError:
            raise
        except Exception as exc:  # noqa: BLE001 - the tracer cannot build some group: find the roots, restart without them
            try:
                graph = dependency.dependency_graph(model, example)
            except Exception:  # noqa: BLE001 - it cannot trace the model at all
                raise _tracer_failed(exc) from None
            roots = [m for m in graph.module2node if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
                     and m not in ignored]
            result.untraceable = dependency.untraceable_roots(graph, roots, names)
            if not result.untraceable:
                raise _tracer_failed(exc) from None
            return result
        if config.allocation != "uniform":
            ratios = allocated_ratios(model, example, pruner, importance, config.allocation, config.hidden,
                                      config.round_to, amount, names, frozen, num_heads,
                                      table)
            pruner = _pruner(model, example, importance, config, amount, ignored, num_heads, ratios)
    verify = GroupCheck(model, check_inputs(task, example))
    groups = pruner.step(interactive=True)
    while True:
        try:
            group = next(groups)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 - the tracer failed to build a group: find which roots, restart without them
            roots = [m for m in pruner.DG.module2node if isinstance(m, tuple(pruner.root_module_types))
                     and m not in pruner.ignored_layers]
            result.untraceable = dependency.untraceable_roots(pruner.DG, roots, names, pruner.estimate_importance)
            if not result.untraceable:
                raise _tracer_failed(exc) from None
            return result
        root = names.get(id(group[0].dep.target.module), "?")
        reason = dependency.blocked_reason(group, names, frozen=frozen, hidden=config.hidden)
        if reason is not None:
            result.blocked[root] = reason
            continue
        _record_kept(result.kept_out, group, names, pruner.DG)
        verify.remove(group, names, pruner.DG)
        try:
            group.prune()
        except Exception as exc:  # noqa: BLE001 - a handler that cannot prune this layer (e.g. stacked LSTM)
            result.failed_root, result.error = root, f"the pruning handler failed ({first_line(exc)})"
            return result
        error = runs_as_before(model, example, reference) or verify.check(model, group)
        if error:
            result.failed_root, result.error = root, error
            return result
        result.pruned_groups += 1
    recurrent = prune_recurrent(model, amount, verify.inputs, ignored=ignored_names, round_to=config.round_to)
    result.recurrent, result.pruned_groups = recurrent.kept, result.pruned_groups + len(recurrent.kept)
    result.blocked.update(recurrent.skipped)
    model.zero_grad(set_to_none=True)
    result.heads = {n: list(v) for n, v in attention.sync_head_counts(blocks).items()}
    return result


def _tracer_failed(exc: BaseException) -> SlimkitError:
    return SlimkitError(f"channel pruning cannot trace this model's channel dependencies ({first_line(exc)})",
                        "list the layers around it in ignored=..., or prune with prune.Magnitude / prune.NM")


def _record_kept(kept_out: dict[str, list[int]], group: Any, names: dict[int, str], graph: Any) -> None:
    """Note which original output channels of each Conv/Linear survive ``group`` (for reconstruction)."""
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and graph.is_out_channel_pruning_fn(dep.handler):
            name = names.get(id(module), "?")
            current = kept_out.get(name, list(range(module.weight.shape[0])))
            drop = {int(i) for i in idxs}
            kept_out[name] = [c for j, c in enumerate(current) if j not in drop]


def _pruner(model: nn.Module, example: tuple, importance: Any, config: Channels, amount: float,
            ignored: list[nn.Module], num_heads: dict[nn.Module, int],
            ratios: dict[nn.Module, float] | None = None) -> Any:
    tp = dependency.torch_pruning()
    with time_limit(TRACE_SECONDS, "channel pruning: tracing the model's channel dependencies",
                    "this graph is beyond the tracer: use prune.Magnitude / prune.NM, or ignored=... for its blocks"):
        return tp.pruner.MetaPruner(
            model, dependency.tp_inputs(example), importance=importance, pruning_ratio=0.0 if ratios is not None
            else amount, pruning_ratio_dict=ratios or None, global_pruning=config.scope == "global",
            round_to=config.round_to, ignored_layers=ignored, num_heads=num_heads, prune_num_heads=bool(num_heads),
            prune_head_dims=False, head_pruning_ratio=amount if num_heads else 0.0)


def _example(task: Task) -> tuple:
    example = getattr(task, "example", None)
    if example is None:
        raise SlimkitError("channel pruning needs an example input to trace the model",
                           "pass a Task (or any object with .example)")
    return example if isinstance(example, tuple) else (example,)

