"""Per-layer SVD ranks from measured sensitivity under one parameter budget.

Layers differ: a classifier's last layer or an attention projection may break at a rank another
layer tolerates. For each layer and a grid of kept-parameter fractions we measure how far the
model's *output* moves (relative squared error on a calibration batch, label-free, so it works for
logits and embeddings alike) when only that layer is truncated. Then a greedy allocation starts
every layer at its cheapest rank and repeatedly buys the upgrade with the largest error decrease
per extra parameter until the budget (``ratio`` of the targeted layers' weights) is spent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimkit.errors import SlimkitError
from slimkit.factorize.layers import unsupported_reason, weight_params
from slimkit.train._progress import progress_bar

#: Fractions of a layer's weights tried per layer; 1.0 means "leave the layer whole".
GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)


def _inputs(task: Any) -> tuple[Any, ...]:
    if task is None or not (task.calib or task.example):
        raise SlimkitError("SVD allocation='sensitivity' needs a task with calibration data",
                           "pass the task to sk.apply, or use allocation='uniform'")
    return tuple(task.calib[0]) if task.calib else tuple(task.example)


def output_error(model: nn.Module, inputs: tuple[Any, ...], reference: torch.Tensor) -> float:
    """||y - y_ref||^2 / ||y_ref||^2 of the model's (first) output."""
    out = model(*inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return float(((out.float() - reference) ** 2).sum() / (reference ** 2).sum().clamp(min=1e-12))


def allocate_ranks(model: nn.Module, names: list[str], ratio: float, task: Any) -> dict[str, int]:
    """``{layer: rank}`` for the layers worth factorizing; layers left out stay whole."""
    from slimkit.factorize.svd import as_matrix, rank_for_ratio, truncated_svd

    inputs = _inputs(task)
    model.eval()
    layers = {n: model.get_submodule(n) for n in names if unsupported_reason(model.get_submodule(n)) is None}
    options: dict[str, list[tuple[int, int, float]]] = {}  # name -> [(rank, params, error)] cheapest first
    with torch.no_grad(), progress_bar(True) as bar:
        ref = model(*inputs)
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).float()
        job = bar.add_task("SVD sensitivity", total=len(layers), info="") if bar else None
        for name, layer in layers.items():
            w = layer.weight.data
            original = w.clone()
            m, n = as_matrix(layer).shape
            full = weight_params(layer)
            bias = full - m * n
            rows = []
            for frac in GRID[:-1]:
                rank = rank_for_ratio(m, n, frac)
                params = rank * (m + n) + bias
                if params >= full or any(r == rank for r, _, _ in rows):
                    continue
                left, right = truncated_svd(as_matrix(layer), rank)
                w.copy_((left @ right).reshape(w.shape))
                rows.append((rank, params, output_error(model, inputs, ref)))
                w.copy_(original)
            options[name] = rows + [(min(m, n), full, 0.0)]
            if bar:
                bar.advance(job)
    return _greedy(options, ratio * sum(weight_params(layer) for layer in layers.values()))


def _greedy(options: dict[str, list[tuple[int, int, float]]], budget: float) -> dict[str, int]:
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
