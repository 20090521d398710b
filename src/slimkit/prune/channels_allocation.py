"""MACs-aware channel allocation: how many channels each dependency group keeps for a MACs budget.

A uniform ratio prunes every group by the same fraction, although one channel of a mid-network
conv can cost a hundred times the MACs of one unit of a classifier's hidden layer: the uniform
ratio pays for a MACs target with capacity where it saves almost nothing. Here channels are
removed one chunk at a time, always the chunk that gives up the least (mean-normalised) importance
per MAC saved: a greedy knapsack. Each Conv/Linear is modelled as ``MACs0 * kept_in * kept_out``
(the kept fractions of the groups that own its input and output channels; a depthwise conv
follows its output only), so the cost of a channel falls as its neighbours shrink.

With a measured latency table (``slimkit.measure.latency_table``) the same greedy pays for the MACs
budget in milliseconds instead: each step removes the chunk that loses the least importance per
ms saved, so layers that are slow for their MACs (a stem on large feature maps, pooling, wide
late convs) give up channels first and the model at the MACs target runs faster.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.graph import dependency
from slimkit.measure.flops import count_flops
from slimkit.measure.latency_table import LatencyTable, LeafCost

_MIN_KEPT = 0.25  # no group drops below a quarter of its channels: a thin bottleneck starves every layer after it
_LAST_RESORT = 1e9  # cost offset of chunks that save MACs but no measured time: taken only when nothing else is left
_CHUNKS_PER_GROUP = 64  # granularity of the greedy for wide groups (speed; narrow groups go one by one)


@dataclasses.dataclass
class _Group:
    root: nn.Module
    channels: int
    chunk: int
    importance: torch.Tensor  # (channels,) ascending: the order channels would be removed in
    kept: int = 0

    # layers act in series, so what counts is the fraction of a group's remaining importance lost
    # (log utility): the last channels of a layer get ever dearer, none is emptied
    def loss_of_removing(self) -> float:
        """Log of the importance left now over what is left once the next chunk is gone."""
        removed = self.channels - self.kept
        left = float(self.importance[removed:].sum())
        return math.log(left / max(left - float(self.importance[removed:removed + self.chunk].sum()), 1e-12))

    def gain_of_restoring(self) -> float:
        """Log of the importance left once the last removed chunk is back over what is left now."""
        removed = self.channels - self.kept
        left = float(self.importance[removed:].sum())
        return math.log((left + float(self.importance[removed - self.chunk:removed].sum())) / max(left, 1e-12))


@dataclasses.dataclass
class _Layer:
    macs: float  # MACs of the unpruned layer
    in_group: int | None  # index of the group that owns its input channels
    out_group: int | None
    cost: LeafCost | None = None  # measured ms by kept fractions (allocation by latency)

    def widths(self, fractions: list[float]) -> tuple[float, float]:
        """Kept (input, output) fractions under the groups' ``fractions``."""
        return (1.0 if self.in_group is None else fractions[self.in_group],
                1.0 if self.out_group is None else fractions[self.out_group])

    def macs_at(self, fractions: list[float]) -> float:
        kin, kout = self.widths(fractions)
        return self.macs * kin * kout

    def ms_at(self, fractions: list[float]) -> float:
        return self.cost.at(*self.widths(fractions)) if self.cost is not None else 0.0


def _change(layers: list[_Layer], fractions: list[float], g: int, fraction: float) -> tuple[float, float]:
    """(MACs, ms) the ``layers`` touching group ``g`` would gain with ``g`` at ``fraction`` (negative: saved)."""
    trial = fractions.copy()
    trial[g] = fraction
    return (sum(l.macs_at(trial) - l.macs_at(fractions) for l in layers),
            sum(l.ms_at(trial) - l.ms_at(fractions) for l in layers))


def allocate(groups: list[Any], importance: Callable[[Any], torch.Tensor | None], graph: Any,
             leaf_macs: dict[nn.Module, int], keep: float, round_to: int | None,
             table: LatencyTable | None = None, names: dict[int, str] | None = None) -> dict[nn.Module, float]:
    """Pruning ratio per group root so the modelled MACs are at most ``keep`` of the original.

    ``groups``: the prunable Torch-Pruning groups; ``leaf_macs``: MACs of every executed leaf
    module of the unpruned model (``count_flops(...).by_leaf`` by module). Without ``table`` each
    step removes the chunk losing least importance per MAC saved; with a measured ``table``
    (and ``names``: id(module) -> name) per millisecond saved, so the MACs budget is paid
    where it buys the most time. The ratios are meant for ``MetaPruner(pruning_ratio_dict=...)``,
    which keeps exactly the chosen counts.
    """
    step = round_to or 1
    state: list[_Group] = []
    layers: dict[str, _Layer] = {}
    out_group_of: dict[str, int] = {}  # every module whose output channels a group owns (BN too)
    for group in groups:
        scores = importance(group)
        channels = len(group[0].idxs)
        if scores is None or channels <= step:
            continue
        g = len(state)
        chunk = max(step, step * (channels // (_CHUNKS_PER_GROUP * step)))
        state.append(_Group(group[0].dep.target.module, channels, chunk,
                            scores.detach().float().cpu().sort().values, kept=channels))
        for dep, _ in group:
            module = dep.target.module
            key = (names or {}).get(id(module), str(id(module)))
            if graph.is_out_channel_pruning_fn(dep.handler):
                out_group_of[key] = g
            counted = isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module in leaf_macs
            cost = table.costs.get(key) if table is not None else None
            if not counted and cost is None:
                continue
            layer = layers.setdefault(key, _Layer(float(leaf_macs.get(module, 0)) if counted else 0.0, None, None, cost))
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            if graph.is_out_channel_pruning_fn(dep.handler):
                layer.out_group = g
            elif graph.is_in_channel_pruning_fn(dep.handler) and not depthwise:
                layer.in_group = g
    if table is not None:
        _add_width_free(layers, out_group_of, table)
    total = float(sum(leaf_macs.values()))
    variable = sum(layer.macs for layer in layers.values())
    fixed = total - variable
    touching: list[list[_Layer]] = [[] for _ in state]
    for layer in layers.values():
        for g in {layer.in_group, layer.out_group} - {None}:
            touching[g].append(layer)

    fractions = [1.0] * len(state)
    current = fixed + sum(layer.macs_at(fractions) for layer in layers.values())
    budget = keep * total
    while current > budget:
        best, best_cost, best_macs = None, float("inf"), current
        # a step that reaches the budget ends the greedy: among those, the one landing closest to it
        # (a coarse chunk of a narrow group can overshoot far; the model should use its budget)
        last, last_macs = None, -1.0
        for g, grp in enumerate(state):
            if grp.kept - grp.chunk < max(step, math.ceil(_MIN_KEPT * grp.channels)):
                continue
            lost = grp.loss_of_removing()
            macs_change, ms_change = _change(touching[g], fractions, g, (grp.kept - grp.chunk) / grp.channels)
            macs_saved = -macs_change
            saved = macs_saved if table is None else -ms_change
            if saved > 0:
                cost = lost / saved
            elif macs_saved > 0:  # the table sees no time saved (noise on a tiny layer): a last resort, by MACs
                cost = _LAST_RESORT + lost / macs_saved
            else:
                cost = float("inf")
            if cost < best_cost and macs_saved > 0:
                best, best_cost, best_macs = g, cost, current - macs_saved
            if macs_saved > 0 and last_macs < current - macs_saved <= budget:
                last, last_macs = g, current - macs_saved
        if last is not None:
            best, best_macs = last, last_macs
        if best is None:
            break
        state[best].kept -= state[best].chunk
        fractions[best] = state[best].kept / state[best].channels
        current = best_macs
    _fill_back(state, touching, fractions, current, budget, by_ms=table is not None)
    # MetaPruner keeps int(channels * (1 - ratio)) channels: aim half a channel above ``kept``
    return {grp.root: (grp.channels - grp.kept - 0.5) / grp.channels
            for grp in state if grp.kept < grp.channels}


def _fill_back(state: list[_Group], touching: list[list[_Layer]], fractions: list[float], current: float,
               budget: float, by_ms: bool) -> None:
    """Give chunks back while the budget allows, most importance regained per MAC (or ms) first.

    A chunk of a wide group can jump well past the budget (8 channels of a ResNet's first stage
    are 3% of its MACs); this lands the allocation close to the target instead of below it.
    """
    while True:
        best, best_value, best_macs = None, -1.0, current
        for g, grp in enumerate(state):
            if grp.channels - grp.kept < grp.chunk:
                continue
            macs_added, ms_added = _change(touching[g], fractions, g, (grp.kept + grp.chunk) / grp.channels)
            if current + macs_added > budget:
                continue
            value = grp.gain_of_restoring() / max(ms_added if by_ms else macs_added, 1e-12)
            if value > best_value:
                best, best_value, best_macs = g, value, current + macs_added
        if best is None:
            return
        state[best].kept += state[best].chunk
        fractions[best] = state[best].kept / state[best].channels
        current = best_macs


def _add_width_free(layers: dict[str, _Layer], out_group_of: dict[str, int], table: LatencyTable) -> None:
    """Activations and pooling run at the width of the module they read from: give them its group."""
    for name, source in table.feeds.items():
        seen = {name}
        while source in table.feeds and source not in out_group_of and source not in seen:
            seen.add(source)
            source = table.feeds[source]
        if source in out_group_of and name not in layers and name in table.costs:
            layers[name] = _Layer(0.0, None, out_group_of[source], table.costs[name])


def allocated_ratios(model: nn.Module, example: tuple, pruner: Any, importance: Any, allocation: str, hidden: bool,
                     round_to: int, amount: float, names: dict[int, str], frozen: dict[int, str],
                     num_heads: dict[nn.Module, int], table: LatencyTable | None) -> dict[nn.Module, float]:
    """Per-group ratios of ``allocation='macs'`` / ``'latency'``: keep ``1 - amount`` of the MACs where they cost least."""
    if num_heads:
        raise SlimkitError(f"allocation={allocation!r} does not allocate attention heads",
                           "use allocation='uniform', or heads=False to keep the heads")
    groups = [g for g in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                  root_module_types=pruner.root_module_types)
              if dependency.blocked_reason(g, names, frozen=frozen, hidden=hidden) is None]
    by_leaf = count_flops(model, example).by_leaf
    leaf_macs = {model.get_submodule(n): macs for n, macs in by_leaf.items()}
    return allocate(groups, importance, pruner.DG, leaf_macs, 1.0 - amount, round_to, table, names)
