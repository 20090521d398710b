"""MACs-aware channel allocation: how many channels each dependency group keeps for a MACs budget.

A uniform ratio prunes every group by the same fraction, although one channel of a mid-network
conv can cost a hundred times the MACs of one unit of a classifier's hidden layer: the uniform
ratio pays for a MACs target with capacity where it saves almost nothing. Here channels are
removed one chunk at a time, always the chunk that gives up the least (mean-normalised) importance
per MAC saved: a greedy knapsack. Each Conv/Linear is modelled as ``MACs0 * kept_in * kept_out``
(the kept fractions of the groups that own its input and output channels; a depthwise conv
follows its output only), so the cost of a channel falls as its neighbours shrink.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn as nn

_MIN_KEPT = 0.25  # no group drops below a quarter of its channels: a thin bottleneck starves every layer after it
_CHUNKS_PER_GROUP = 64  # granularity of the greedy for wide groups (speed; narrow groups go one by one)


@dataclasses.dataclass
class _Group:
    root: nn.Module
    channels: int
    chunk: int
    importance: torch.Tensor  # (channels,) ascending: the order channels would be removed in
    kept: int = 0


@dataclasses.dataclass
class _Layer:
    macs: float  # MACs of the unpruned layer
    in_group: int | None  # index of the group that owns its input channels
    out_group: int | None


def macs_allocation(groups: list[Any], importance: Callable[[Any], torch.Tensor | None], graph: Any,
                    leaf_macs: dict[nn.Module, int], keep: float, round_to: int | None) -> dict[nn.Module, float]:
    """Pruning ratio per group root so the modelled MACs are at most ``keep`` of the original.

    ``groups``: the prunable Torch-Pruning groups; ``leaf_macs``: MACs of every executed leaf
    module of the unpruned model (``count_flops(...).by_leaf`` by module). The ratios are meant
    for ``MetaPruner(pruning_ratio_dict=...)``, which keeps exactly the chosen counts.
    """
    step = round_to or 1
    state: list[_Group] = []
    layers: dict[nn.Module, _Layer] = {}
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
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or module not in leaf_macs:
                continue
            layer = layers.setdefault(module, _Layer(float(leaf_macs[module]), None, None))
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            if graph.is_out_channel_pruning_fn(dep.handler):
                layer.out_group = g
            elif graph.is_in_channel_pruning_fn(dep.handler) and not depthwise:
                layer.in_group = g
    total = float(sum(leaf_macs.values()))
    variable = sum(layer.macs for layer in layers.values())
    fixed = total - variable

    def modelled(kept: list[float]) -> float:
        return fixed + sum(l.macs * (1.0 if l.in_group is None else kept[l.in_group])
                           * (1.0 if l.out_group is None else kept[l.out_group]) for l in layers.values())

    fractions = [1.0] * len(state)
    current = modelled(fractions)
    while current > keep * total:
        best, best_cost, best_macs = None, float("inf"), current
        for g, grp in enumerate(state):
            if grp.kept - grp.chunk < max(step, math.ceil(_MIN_KEPT * grp.channels)):
                continue
            removed = grp.channels - grp.kept
            # layers act in series, so what counts is the fraction of a group's remaining importance
            # lost (log utility): the last channels of a layer get ever dearer, none is emptied
            left = float(grp.importance[removed:].sum())
            lost = math.log(left / max(left - float(grp.importance[removed:removed + grp.chunk].sum()), 1e-12))
            trial = fractions.copy()
            trial[g] = (grp.kept - grp.chunk) / grp.channels
            macs = modelled(trial)
            saved = current - macs
            cost = lost / saved if saved > 0 else float("inf")
            if cost < best_cost:
                best, best_cost, best_macs = g, cost, macs
        if best is None:
            break
        state[best].kept -= state[best].chunk
        fractions[best] = state[best].kept / state[best].channels
        current = best_macs
    # MetaPruner keeps int(channels * (1 - ratio)) channels: aim half a channel above ``kept``
    return {grp.root: (grp.channels - grp.kept - 0.5) / grp.channels
            for grp in state if grp.kept < grp.channels}
