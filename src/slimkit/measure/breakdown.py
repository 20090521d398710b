"""Per-layer breakdown: which layers hold the parameters, do the MACs and take the time.

This is where a user decides what to prune, factorize or quantize first. Time per layer comes
from forward hooks timing each leaf module over a few runs (median per layer); hooks add a few
microseconds each, so shares are more trustworthy than absolute per-layer times. Work done
outside leaf modules (functional ops in a ``forward``, parameters held directly by a parent)
is one row named ``(other)``, so every share column sums to 1.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure._call import Example, device_for, pinned_threads, prepared, require_module, synchronize
from slimkit.measure._trace import Tracer
from slimkit.measure.flops import FlopCount, count_flops

OTHER = "(other)"
SORT_KEYS = ("time", "macs", "params")


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One leaf module (or the ``(other)`` remainder) and its shares of the whole model."""

    name: str
    kind: str  # module class name
    params: int
    macs: int
    time_ms: float  # median over runs, summed over the module's calls in one forward
    params_share: float
    macs_share: float
    time_share: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def layer_breakdown(model: nn.Module, example: Example, device: str | torch.device | None = None,
                    threads: int | None = None, runs: int = 5, sort_by: str = "time",
                    flops: FlopCount | None = None) -> list[LayerRow]:
    """Rows for every executed leaf module, sorted by ``sort_by`` ("time", "macs" or "params"), largest first."""
    if sort_by not in SORT_KEYS:
        raise SlimkitError(f"sort_by={sort_by!r} is not a breakdown column", f"use one of {', '.join(SORT_KEYS)}")
    if runs < 1:
        raise SlimkitError(f"runs={runs} is invalid", "use 1 or more runs")
    require_module(model, "layer_breakdown")
    dev = device_for(model, device)
    flops = flops if flops is not None else count_flops(model, example, dev)

    per_leaf: dict[str, list[float]] = {}
    totals: list[float] = []
    with prepared(model, example, dev) as (args, kwargs), pinned_threads(threads), torch.inference_mode():
        with Tracer(model, dev) as tracer:  # warm-up, and find which modules are leaves
            model(*args, **kwargs)
        leaves = set(tracer.leaves())
        with Tracer(model, dev, timed=True, only=leaves) as tracer:
            for _ in range(runs):
                tracer.reset()
                synchronize(dev)
                t0 = time.perf_counter()
                model(*args, **kwargs)
                synchronize(dev)
                totals.append(time.perf_counter() - t0)
                for name in tracer.leaves():
                    per_leaf.setdefault(name, []).append(tracer.records[name].seconds)

    total_s = statistics.median(totals)
    seen: set[int] = set()
    raw = []  # (name, kind, params, macs, seconds)
    for name, secs in per_leaf.items():
        mod = model.get_submodule(name)
        params = 0
        for p in mod.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel()
        secs = secs + [0.0] * (runs - len(secs))  # runs in which the layer did not execute
        raw.append((name, type(mod).__name__, params, flops.by_leaf.get(name, 0), statistics.median(secs)))

    total_params = sum(p.numel() for p in model.parameters())
    other = (OTHER, "-", total_params - sum(r[2] for r in raw), flops.outside_leaves,
             max(total_s - sum(r[4] for r in raw), 0.0))
    if other[2] or other[3] or other[4] > 0:
        raw.append(other)

    sum_s = max(total_s, sum(r[4] for r in raw))
    rows = [LayerRow(name=name, kind=kind, params=params, macs=macs, time_ms=secs * 1e3,
                     params_share=_share(params, total_params), macs_share=_share(macs, flops.macs),
                     time_share=_share(secs, sum_s))
            for name, kind, params, macs, secs in raw]
    key = {"time": lambda r: r.time_ms, "macs": lambda r: r.macs, "params": lambda r: r.params}[sort_by]
    return sorted(rows, key=key, reverse=True)


def _share(part: float, whole: float) -> float:
    return float(part) / whole if whole > 0 else 0.0
