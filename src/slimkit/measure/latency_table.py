"""Measured latency lookup tables: how long each layer takes (at a fraction of its channels).

One table type serves both users: channel pruning keys layers of one model by name and times each
at a grid of widths (below); NAS keys layers by their type and shape (``slimkit.nas.predictor``)
and times each once. Timing is always interleaved rounds (``measure.latency.interleaved_samples``).

MACs are a poor guide to where time goes on a CPU. In a ResNet-18 at batch 8 the 7x7 stem, its
BatchNorm and the max-pool take a quarter of the time for 7% of the MACs (they stream 112x112
feature maps through memory), and a 3x3 conv at 512 channels takes 1.3x as long as one at 64
with the same MACs. Pruning to a MACs target therefore saves less time than it promises. Here
every layer whose width pruning can change is timed on this machine at a grid of kept input and
output fractions; ``allocation="latency"`` in :mod:`slimkit.prune.channels_allocation` reads the
tables to remove channels where they save the most time for the importance lost (the idea of
HALP, Shen et al. 2022, with measured tables instead of a latency model).

Only the *change* of time with width matters to the allocation, so layers whose width no group
can change (embeddings, LayerNorm over an unpruned hidden size) are not timed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from typing import Any, Callable, Hashable, Mapping

import torch
import torch.nn as nn

from slimkit.measure._call import pinned_threads
from slimkit.measure.latency import interleaved_samples

log = logging.getLogger("slimkit.prune")

GRID = (0.25, 0.5, 0.75, 1.0)  # kept fractions timed; costs between them are interpolated (conv time is ~bilinear)
_WIDTH_FREE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
               nn.LeakyReLU, nn.ELU, nn.Mish, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
               nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.Dropout, nn.Identity)


@dataclasses.dataclass(frozen=True)
class LeafCost:
    """Fastest ms of one leaf module at every (kept input, kept output) fraction of ``grid``.

    ``ms[i][j]``: input width ``grid[i]``, output width ``grid[j]``. A layer whose input width
    follows its output (BatchNorm, activations, pooling, depthwise convs) has one row, read by
    its output fraction alone.
    """

    grid: tuple[float, ...]
    ms: tuple[tuple[float, ...], ...]

    @property
    def full_ms(self) -> float:
        return self.ms[-1][-1]

    def at(self, kept_in: float, kept_out: float) -> float:
        """Interpolated ms with ``kept_in`` / ``kept_out`` of the channels (linear below the grid)."""
        if len(self.ms) == 1:
            return _interp(self.grid, self.ms[0], kept_out)
        column = [_interp(self.grid, row, kept_out) for row in self.ms]
        return _interp(self.grid, column, kept_in)


@dataclasses.dataclass
class LatencyTable:
    """Costs of the width-dependent leaf modules, plus which module feeds each width-free one.

    ``feeds``: a width-free module (ReLU, pooling) has no channels of its own in the dependency
    groups; it runs at the width of the module named here, the nearest upstream module that does.
    """

    costs: dict[Hashable, LeafCost]
    feeds: dict[str, str]
    batch: int
    threads: int | None
    untimed: dict[str, str] = dataclasses.field(default_factory=dict)  # layer -> why its time is taken as fixed

    def ms(self, key: Hashable) -> float:
        """Full-width ms of one layer."""
        return self.costs[key].full_ms

    def time_layers(self, calls: Mapping[Hashable, Callable[[], Any]], *, rounds: int = 5,
                    min_time_s: float = 0.02) -> LatencyTable:
        """Add the median ms of each call not yet in the table (interleaved rounds, full width only)."""
        new = {k: fn for k, fn in calls.items() if k not in self.costs}
        for key, ms in time_calls(new, self.threads, rounds, min_time_s).items():
            self.costs[key] = LeafCost((1.0,), ((ms,),))
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "threads": self.threads,
                "full_ms": {n: round(c.full_ms, 4) for n, c in self.costs.items()}, "untimed": dict(self.untimed)}


def time_calls(calls: Mapping[Hashable, Callable[[], Any]], threads: int | None, rounds: int, min_time_s: float,
               reduce: Callable[[list[float]], float] = statistics.median) -> dict[Hashable, float]:
    """ms per call of every function over ``rounds`` interleaved rounds (two warm-up calls each), reduced
    by ``reduce`` (the median; ``min`` where only load can add time)."""
    with pinned_threads(threads or None), torch.inference_mode():
        samples = interleaved_samples(calls, rounds=rounds, min_time_s=min_time_s)
    return {k: float(reduce(v)) for k, v in samples.items()}


def measure_table(model: nn.Module, example: tuple, batch: int | None = None, threads: int | None = None,
                  runs: int = 7, grid: tuple[float, ...] = GRID) -> LatencyTable:
    """Time every width-dependent leaf of ``model`` at ``grid`` fractions, on the example's inputs.

    ``batch``: repeat the example along its first axis to this batch (the deployment batch); the
    default keeps the example as it is.
    """
    inputs = tuple(_batched(x, batch) for x in example)
    calls, feeds = _record_calls(model, inputs)
    costs: dict[str, LeafCost] = {}
    untimed: dict[str, str] = {}
    seen: dict[tuple, LeafCost] = {}
    with pinned_threads(threads), torch.inference_mode():
        for name, (module, x, axis) in calls.items():
            key = (repr(module), tuple(x.shape), axis)  # identical layers on identical inputs are timed once
            if key not in seen:
                try:
                    seen[key] = _time_leaf(module, x, axis, grid, runs)
                except Exception as exc:  # noqa: BLE001 - a layer we cannot rebuild narrower counts as fixed cost
                    untimed[name] = f"not timed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
                    log.info("latency table: %s %s", name, untimed[name])
                    continue
            costs[name] = seen[key]
    feeds = {n: s for n, s in feeds.items() if n in costs and s in costs}
    return LatencyTable(costs, feeds, batch=int(inputs[0].shape[0]) if inputs else 0,
                        threads=torch.get_num_threads() if threads is None else threads, untimed=untimed)


def _batched(x: Any, batch: int | None) -> Any:
    if batch is None or not isinstance(x, torch.Tensor) or x.dim() == 0:
        return x
    reps = math.ceil(batch / x.shape[0])
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch]


_Call = tuple[nn.Module, torch.Tensor, int]  # module, its first input, the input's channel axis


def _record_calls(model: nn.Module, inputs: tuple) -> tuple[dict[str, _Call], dict[str, str]]:
    """First input of every timed leaf, and for width-free leaves the module whose output they read."""
    calls: dict[str, _Call] = {}
    feeds: dict[str, str] = {}
    producer: dict[int, str] = {}  # id(output tensor) -> module that wrote it
    last_by_shape: dict[tuple[int, ...], str] = {}  # functional ops (x + y) hide the producer: nearest same-shaped output
    kept_alive: list[torch.Tensor] = []  # so no id() above is reused by a later tensor
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is None or name in calls or name in feeds:
                return
            if _timed(module):
                channel_axis = x.dim() - 1 if isinstance(module, nn.Linear) else 1
                calls[name] = (module, x.detach(), channel_axis)
            elif isinstance(module, _WIDTH_FREE) and x.dim() >= 2:
                source = producer.get(id(x)) or last_by_shape.get(tuple(x.shape))
                if source is not None and source in calls:
                    feeds[name] = source
                    calls[name] = (module, x.detach().clone(), calls[source][2])
            if isinstance(output, torch.Tensor):
                producer[id(output)] = name
                last_by_shape[tuple(output.shape)] = name
                kept_alive.append(output)
        return fn

    for name, module in model.named_modules():
        if name and not list(module.children()):
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls, feeds


def _timed(module: nn.Module) -> bool:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.groups == 1 or module.groups == module.in_channels == module.out_channels
    return isinstance(module, (nn.Linear, nn.modules.batchnorm._BatchNorm))


def _time_leaf(module: nn.Module, x: torch.Tensor, axis: int, grid: tuple[float, ...], runs: int) -> LeafCost:
    """All grid points of one layer, timed in interleaved rounds: a burst of load on a shared machine
    then slows every width alike instead of making one width look slower than a wider one."""
    two_sided = isinstance(module, nn.Linear) or (isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1)
    rows = grid if two_sided else (1.0,)
    points = [_narrowed(module, x, axis, fi, fo) for fi in rows for fo in grid]
    fastest = time_calls(dict(enumerate(points)), None, runs, 0.0, reduce=min)  # load only ever adds time
    ms = [fastest[k] for k in range(len(points))]
    return LeafCost(tuple(grid), tuple(tuple(ms[r * len(grid):(r + 1) * len(grid)]) for r in range(len(rows))))


def _narrowed(module: nn.Module, x: torch.Tensor, axis: int, kept_in: float, kept_out: float) -> Callable[[], Any]:
    """A call of ``module`` at the kept widths: a narrower copy on ``x`` cut to its input width."""
    if not _timed(module):  # width-free: the module itself on fewer channels
        inp = x.narrow(axis, 0, _width(x.shape[axis], kept_out)).contiguous(memory_format=_format(x))
        return lambda: module(inp)
    if isinstance(module, nn.Linear):
        i, o = _width(module.in_features, kept_in), _width(module.out_features, kept_out)
        layer: nn.Module = nn.Linear(i, o, bias=module.bias is not None)
        inp = x[..., :i].contiguous()
    elif isinstance(module, nn.modules.conv._ConvNd):
        o = _width(module.out_channels, kept_out)
        i = o if module.groups > 1 else _width(module.in_channels, kept_in)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(module.kernel_size)]  # subclasses may take other args
        layer = conv(i, o, module.kernel_size, stride=module.stride, padding=module.padding, dilation=module.dilation,
                     groups=o if module.groups > 1 else 1, bias=module.bias is not None,
                     padding_mode=module.padding_mode)
        inp = x[:, :i].contiguous(memory_format=_format(x))
    else:  # BatchNorm: the width is its output's
        o = _width(module.num_features, kept_out)
        layer = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()](o)
        inp = x[:, :o].contiguous(memory_format=_format(x))
    layer = layer.to(x.dtype).eval()
    return lambda: layer(inp)


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        and not x.is_contiguous() else torch.contiguous_format


def _width(channels: int, kept: float) -> int:
    return max(1, round(channels * kept))


def _interp(grid: tuple[float, ...], values: tuple[float, ...] | list[float], at: float) -> float:
    """Piecewise-linear in ``at``; linear extrapolation below the first grid point, towards 0 ms at 0."""
    if at <= grid[0]:
        return values[0] * at / grid[0]
    for k in range(1, len(grid)):
        if at <= grid[k]:
            t = (at - grid[k - 1]) / (grid[k] - grid[k - 1])
            return values[k - 1] + t * (values[k] - values[k - 1])
    return values[-1]
