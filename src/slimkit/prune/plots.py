"""Pictures of sparsity: which layers were pruned how much, and how sparsity grew over steps.

PNG files (matplotlib's Agg canvas, no pyplot state, so a user's interactive backend is left
alone), written atomically so a report never embeds half a picture.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from slimkit.core.atomic import atomic_write
from slimkit.core.errors import SlimkitError
from slimkit.train.masks import layer_sparsity  # noqa: F401  (the snapshots the heatmap draws; kept importable here)

#: layer -> {column (e.g. step or weight kind) -> fraction of zero weights}
Grid = Mapping[str, Mapping[str, float]]
#: [(step, sparsity), ...]
Series = Sequence[tuple[float, float]]

_ROW_INCHES = 0.2  # ~9 pt labels stay legible with 50+ layers


def sparsity_heatmap(rows: Grid | Mapping[str, float] | Iterable[tuple[Any, Mapping[str, float]]],
                     path: str | os.PathLike[str], *, title: str = "Sparsity per layer",
                     column_label: str = "step") -> Path:
    """Layers (rows) x columns heatmap of sparsity in [0, 1]; returns the PNG path.

    ``rows`` is ``{layer: {column: sparsity}}`` (e.g. columns are weight kinds), a flat
    ``{layer: sparsity}`` (one column), or snapshots ``[(step, {layer: sparsity}), ...]`` such as
    ``layer_sparsity(model)`` taken after each pruning step. Missing cells are left blank.
    """
    grid = _as_grid(rows)
    layers = list(grid)
    columns: list[str] = []
    for cells in grid.values():
        columns += [c for c in cells if c not in columns]
    values = [[grid[layer].get(c, math.nan) for c in columns] for layer in layers]
    _check_fractions(v for row in values for v in row if not math.isnan(v))
    fig = _figure(width=min(14.0, 5.0 + 0.45 * len(columns)), height=max(2.8, 1.6 + _ROW_INCHES * len(layers)))
    ax = fig.add_subplot()

    data = np.ma.masked_invalid(np.array(values, dtype=float))
    image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks(range(len(layers)), labels=[_short(n) for n in layers], fontsize=8)
    stride = max(1, math.ceil(len(columns) / 20))  # at most ~20 column labels
    rotate = max(len(c) for c in columns) > 4
    ax.set_xticks(range(0, len(columns), stride), labels=columns[::stride], fontsize=8,
                  rotation=45 if rotate else 0, ha="right" if rotate else "center")
    if len(columns) <= 12 and len(layers) * len(columns) <= 300:  # numbers only where they fit
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
    ax.set_xlabel(column_label)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="fraction of zero weights", fraction=0.05, pad=0.02)
    return _save(fig, path)


def sparsity_trend(history: Series | Mapping[str, Series], path: str | os.PathLike[str], *,
                   target: float | None = None, title: str = "Sparsity vs step", xlabel: str = "step") -> Path:
    """Sparsity over steps, one line per named series, with the ``target`` as a dashed line."""
    series = dict(history) if isinstance(history, Mapping) else {"sparsity": history}
    if not series or not any(len(s) for s in series.values()):
        raise SlimkitError("sparsity_trend: no (step, sparsity) points", "record at least one point")
    _check_fractions(float(v) for s in series.values() for _, v in s)
    if target is not None:
        _check_fractions([target])
    fig = _figure(width=7.0, height=3.8)
    ax = fig.add_subplot()
    for name, points in series.items():
        pts = sorted((float(x), float(y)) for x, y in points)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o" if len(pts) <= 40 else None, markersize=3,
                label=name)
    if target is not None:
        ax.axhline(target, linestyle="--", color="grey", label=f"target {target:.0%}")
    ax.set_ylim(0.0, 1.0)
    ax.yaxis.set_major_formatter("{x:.0%}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of zero weights")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1 or target is not None:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _as_grid(rows: Any) -> dict[str, dict[str, float]]:
    if isinstance(rows, Mapping):
        grid = {str(k): ({"sparsity": float(v)} if isinstance(v, (int, float, torch.Tensor))
                         else {str(c): float(x) for c, x in v.items()}) for k, v in rows.items()}
    else:
        grid = {}
        for step, layers in rows:
            for layer, v in layers.items():
                grid.setdefault(str(layer), {})[str(step)] = float(v)
    if not grid or not any(grid.values()):
        raise SlimkitError("sparsity_heatmap: no layers to plot", "pass {layer: {column: sparsity}} with values")
    return grid


def _check_fractions(values: Iterable[float]) -> None:
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise SlimkitError(f"sparsity {v} is outside [0, 1]", "give fractions of zero weights, not percentages")


def _short(name: str, limit: int = 48) -> str:
    """Keep both ends of long module paths (``encoder.layer.11...attention.output.dense``)."""
    return name if len(name) <= limit else name[:limit // 2 - 1] + "…" + name[-(limit // 2):]


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure  # optional (matplotlib, extra 'report'): imported when used
    except ImportError:
        raise SlimkitError("plotting needs matplotlib, which is not installed",
                           "pip install 'slimkit[report]'") from None
    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
