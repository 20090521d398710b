"""Per-layer breakdown: which layers hold the parameters, do the MACs and take the time.

This is where a user decides what to prune, factorize or quantize first. Time per layer comes
from forward hooks timing each leaf module over a few runs (median per layer); hooks add a few
microseconds each, so shares are more trustworthy than absolute per-layer times. Work done
outside leaf modules (functional ops in a ``forward``, parameters held directly by a parent)
is one row named ``(other)``, timed per run as the forward's time outside every row (so a
preemption inside one layer in one run stays that layer's outlier, removed by its median); each
share is of the sum of the rows' medians, so every share column sums to 1.

A transformer (a stack of attention blocks) is broken down a level up instead (``level="auto"``):
per block its attention, MLP and norms, the embeddings and the head, each module's own time
(its hooks' time minus its children's) summed into its row (``measure.block_units``), so the
attention's matmuls and softmax written in ``forward`` are the attention's, not ``(other)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from typing import Any, Iterator

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure._call import Example, device_for, pinned_threads, prepared, require_module, synchronize
from slimkit.measure._trace import Tracer
from slimkit.measure.block_units import OTHER, Unit, transformer_units
from slimkit.measure.flops import FlopCount, count_flops

SORT_KEYS = ("time", "macs", "params")
LEVELS = ("auto", "leaf", "block")


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One leaf module, or one part of a transformer block (or the ``(other)`` remainder), and its shares."""

    name: str  # module path; a block's part is "PATH attention|MLP|norm|rest"
    kind: str  # module class name(s), "+"-joined for a block's part
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
                    flops: FlopCount | None = None, level: str = "auto") -> list[LayerRow]:
    """Rows sorted by ``sort_by`` ("time", "macs" or "params"), largest first: one per executed leaf module
    (``level="leaf"``) or per transformer block part (``"block"``; ``"auto"``: block when the model has one)."""
    if sort_by not in SORT_KEYS:
        raise SlimkitError(f"sort_by={sort_by!r} is not a breakdown column", f"use one of {', '.join(SORT_KEYS)}")
    if runs < 1:
        raise SlimkitError(f"runs={runs} is invalid", "use 1 or more runs")
    if level not in LEVELS:
        raise SlimkitError(f"level={level!r} is not a breakdown level", f"use one of {', '.join(LEVELS)}")
    require_module(model, "layer_breakdown")
    dev = device_for(model, device)
    flops = flops if flops is not None else count_flops(model, example, dev)
    units = transformer_units(model) if level != "leaf" else None
    if level == "block" and units is None:
        raise SlimkitError(f"{type(model).__name__} has no stack of attention blocks to break down by block",
                           "use level='leaf' (or 'auto')")
    if units is not None:
        return _sorted(_block_rows(model, example, dev, threads, runs, flops, units), sort_by)

    per_leaf: dict[str, list[float]] = {}
    others: list[float] = []  # per run: the forward's time outside every leaf
    with prepared(model, example, dev) as (args, kwargs), pinned_threads(threads), torch.inference_mode():
        with Tracer(model, dev) as tracer:  # warm-up, and find which modules are leaves
            model(*args, **kwargs)
        leaves = set(tracer.leaves())
        for tracer, total in _timed_forwards(model, args, kwargs, dev, leaves, runs):
            for name in tracer.leaves():
                per_leaf.setdefault(name, []).append(tracer.records[name].seconds)
            others.append(max(total - sum(tracer.records[n].seconds for n in tracer.leaves()), 0.0))

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
    other = (OTHER, "-", total_params - sum(r[2] for r in raw), flops.outside_leaves, statistics.median(others))
    if other[2] or other[3] or other[4] > 0:
        raw.append(other)

    sum_s = sum(r[4] for r in raw)  # medians per row: shares of their sum
    rows = [LayerRow(name=name, kind=kind, params=params, macs=macs, time_ms=secs * 1e3,
                     params_share=_share(params, total_params), macs_share=_share(macs, flops.macs),
                     time_share=_share(secs, sum_s))
            for name, kind, params, macs, secs in raw]
    return _sorted(rows, sort_by)


def _timed_forwards(model: nn.Module, args: tuple, kwargs: dict, dev: torch.device, only: set[str],
                    runs: int) -> Iterator[tuple[Tracer, float]]:
    """``runs`` forwards with the ``only`` modules timed (garbage collector paused): per run the tracer and
    the whole forward's seconds."""
    with Tracer(model, dev, timed=True, only=only) as tracer, _no_gc():
        for _ in range(runs):
            tracer.reset()
            synchronize(dev)
            t0 = time.perf_counter()
            model(*args, **kwargs)
            synchronize(dev)
            yield tracer, time.perf_counter() - t0


def _block_rows(model: nn.Module, example: Example, dev: torch.device, threads: int | None, runs: int,
                flops: FlopCount, units: dict[str, Unit]) -> list[LayerRow]:
    """One row per unit: the own time and own MACs of its modules summed (see ``measure.block_units``)."""
    per_unit: dict[str, list[float]] = {}
    with prepared(model, example, dev) as (args, kwargs), pinned_threads(threads), torch.inference_mode():
        with Tracer(model, dev) as tracer:  # warm-up, and find which modules run
            model(*args, **kwargs)
        ran = [n for n, rec in tracer.records.items() if rec.calls > 0]
        parent = _nearest_parents(ran)
        for tracer, total in _timed_forwards(model, args, kwargs, dev, set(ran), runs):
            own = _own({n: tracer.records[n].seconds for n in ran}, parent)
            summed: dict[str, float] = {}
            for name, secs in own.items():
                if units[name].name != OTHER:
                    summed[units[name].name] = summed.get(units[name].name, 0.0) + max(secs, 0.0)
            # per run, so a preemption inside one unit in one run stays that unit's outlier
            summed[OTHER] = max(total - sum(summed.values()), 0.0)
            for unit in summed:
                per_unit.setdefault(unit, []).append(summed[unit])

    own_macs = _own({n: float(flops.by_module.get(n, 0)) for n in ran}, parent)
    kinds = {u.name: u.kind for u in units.values()}
    params: dict[str, int] = {}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params[units[name].name] = params.get(units[name].name, 0) + p.numel()
    raw = []  # (name, kind, params, macs, seconds)
    for unit, secs in per_unit.items():
        if unit == OTHER:
            continue
        macs = int(sum(max(m, 0.0) for n, m in own_macs.items() if units[n].name == unit))
        raw.append((unit, kinds[unit], params.get(unit, 0), macs, statistics.median(secs)))
    total_params = sum(p.numel() for p in model.parameters())
    other = (OTHER, "-", total_params - sum(r[2] for r in raw), max(flops.macs - sum(r[3] for r in raw), 0),
             statistics.median(per_unit[OTHER]))
    if other[2] or other[3] or other[4] > 0:
        raw.append(other)
    sum_s = sum(r[4] for r in raw)  # medians per row: shares of their sum
    return [LayerRow(name=name, kind=kind, params=n_params, macs=macs, time_ms=secs * 1e3,
                     params_share=_share(n_params, total_params), macs_share=_share(macs, flops.macs),
                     time_share=_share(secs, sum_s))
            for name, kind, n_params, macs, secs in raw]


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The garbage collector paused while timing: a collection lands at the same place in every run (the
    allocations repeat), so a median over runs does not remove it; it is one unit's time it does not own."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _nearest_parents(names: list[str]) -> dict[str, str | None]:
    """Each module's nearest ancestor among ``names`` (a ModuleList is never called: it is skipped)."""
    present = set(names)
    out: dict[str, str | None] = {}
    for name in names:
        parts = name.split(".") if name else []
        out[name] = next((".".join(parts[:k]) for k in range(len(parts) - 1, -1, -1)
                          if ".".join(parts[:k]) in present), None)
    return out


def _own(inclusive: dict[str, float], parent: dict[str, str | None]) -> dict[str, float]:
    """Each module's own share of an inclusive quantity (time, MACs): its value minus its children's."""
    own = dict(inclusive)
    for name, up in parent.items():
        if up is not None:
            own[up] -= inclusive[name]
    return own


def _sorted(rows: list[LayerRow], sort_by: str) -> list[LayerRow]:
    key = {"time": lambda r: r.time_ms, "macs": lambda r: r.macs, "params": lambda r: r.params}[sort_by]
    return sorted(rows, key=key, reverse=True)


def _share(part: float, whole: float) -> float:
    return float(part) / whole if whole > 0 else 0.0
