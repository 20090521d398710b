"""Per-layer ranks from measured sensitivity under one parameter budget (SVD, Tucker and CP alike).

Layers differ: a classifier's last layer or an attention projection may break at a rank another
layer tolerates. For each layer and a grid of kept-parameter fractions the sensitivity engine
(``slimkit.measure.sensitivity.scored_variants``) measures how far the model's *output* moves
(relative squared error on a calibration batch, label-free) when only that layer is factorized.
Then a greedy allocation starts every layer at its cheapest rank and repeatedly buys the upgrade
with the largest error decrease per extra parameter until the budget (``ratio`` of the targeted
layers' weights) is spent. Each method supplies its own candidates: ``(rank, params, weight)``.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task
from slimkit.factorize.layers import unsupported_reason, weight_params
from slimkit.measure.sensitivity import output_scorer, scored_variants

#: Fractions of a layer's weights tried per layer; 1.0 means "leave the layer whole".
GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75)
#: ``candidates(layer, fraction) -> (rank, params, reconstructed weight) | None`` (None: not smaller).
Candidates = Callable[[nn.Module, float], "tuple[Hashable, int, torch.Tensor] | None"]


def allocate_ranks(model: nn.Module, names: Sequence[str], ratio: float, task: Task | None,
                   candidates: Candidates, method: str) -> dict[str, Any]:
    """``{layer: rank}`` for the layers worth factorizing; layers left out stay whole."""
    if task is None or not (task.calib or task.example):
        raise SlimkitError(f"{method} allocation='sensitivity' needs a task with calibration data",
                           "pass the task to sk.apply, or use allocation='uniform'")
    inputs = tuple(task.calib[0]) if task.calib else tuple(task.example)
    model.eval()
    layers = {n: model.get_submodule(n) for n in names if unsupported_reason(model.get_submodule(n)) is None}
    found: dict[str, dict[Hashable, tuple[int, torch.Tensor]]] = {}

    def variants(name: str, layer: nn.Module) -> list[tuple[Hashable, torch.Tensor]]:
        rows: dict[Hashable, tuple[int, torch.Tensor]] = {}
        for frac in GRID:
            made = candidates(layer, frac)
            if made is not None and made[1] < weight_params(layer) and made[0] not in rows:
                rows[made[0]] = (made[1], made[2])
        found[name] = rows
        return [(rank, weight) for rank, (_, weight) in rows.items()]

    with torch.no_grad():
        errors = scored_variants(model, output_scorer(model, [inputs]), list(layers), variants,
                                 label=f"{method} sensitivity", progress=True)
    options = {name: sorted(((rank, params, errors[name][rank]) for rank, (params, _) in found[name].items()),
                            key=lambda row: row[1]) + [(None, weight_params(layers[name]), 0.0)]
               for name in layers}
    return _greedy(options, ratio * sum(weight_params(layer) for layer in layers.values()))


def _greedy(options: dict[str, list[tuple[Any, int, float]]], budget: float) -> dict[str, Any]:
    choice = {name: 0 for name in options}  # index into each layer's options
    spent = sum(rows[0][1] for rows in options.values())
    while True:
        best, best_gain = None, 0.0
        for name, rows in options.items():
            i = choice[name]
            if i + 1 >= len(rows):
                continue
            extra = rows[i + 1][1] - rows[i][1]
            gain = (rows[i][2] - rows[i + 1][2]) / max(extra, 1)
            if spent + extra <= budget and (best is None or gain > best_gain):
                best, best_gain = name, gain
        if best is None:
            break
        i = choice[best]
        spent += options[best][i + 1][1] - options[best][i][1]
        choice[best] = i + 1
    return {name: options[name][i][0] for name, i in choice.items() if i < len(options[name]) - 1}
