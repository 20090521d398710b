"""Latency predictor: per-layer latencies measured once (``measure.latency_table``), summed and fitted
to whole-model timings.

Measuring every candidate takes ~0.5 s; predicting it from a table takes microseconds, so the
search can rank or discard architectures before measuring them. Each distinct layer (type and
shape at the serving batch and input size) is timed alone; a model's prediction is
``a * convs + b * others + c``, with ``a``, ``b``, ``c`` fitted by least squares on whole models
that were measured (the sum misses the framework's per-call overhead and the cache effects between
layers). On a shared machine single timings drift with the load, so :meth:`LatencyTable.measure`
and :func:`measure_archs` take medians of interleaved rounds (every layer, or every model, once
per round). The error that matters is the one on architectures the fit did not see:
:meth:`LatencyPredictor.error` reports it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from slimkit.measure import measure_latency
from slimkit.measure.latency_table import LatencyTable, LeafCost, time_calls
from slimkit.nas.cnn import CNNArch, build

Key = tuple[Any, ...]


def layer_keys(arch: CNNArch) -> list[Key]:
    """Every layer of ``arch`` as (type, shape...) with the input it sees (batch left out)."""
    keys: list[Key] = []
    cin, side = arch.in_channels, arch.input_size
    for width, depth, k in zip(arch.widths, arch.depths, arch.kernels):
        for _ in range(depth):
            keys += [("conv", cin, width, k, side), ("bn", width, side), ("relu", width, side)]
            cin = width
        keys.append(("pool", width, side))
        side //= 2
    keys.append(("flatten", cin, side))
    if arch.hidden:
        keys += [("linear", arch.flat, arch.hidden), ("relu1d", arch.hidden), ("linear", arch.hidden, arch.classes)]
    else:
        keys.append(("linear", arch.flat, arch.classes))
    return keys


def layer_module(key: Key, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """The module a key stands for and a random input of its shape."""
    kind = key[0]
    if kind == "conv":
        _, cin, cout, k, side = key
        return nn.Conv2d(cin, cout, k, padding=k // 2), torch.randn(batch, cin, side, side)
    if kind in ("bn", "relu", "pool", "flatten"):
        _, c, side = key
        module = {"bn": nn.BatchNorm2d(c), "relu": nn.ReLU(), "pool": nn.MaxPool2d(2), "flatten": nn.Flatten()}[kind]
        return module, torch.randn(batch, c, side, side)
    if kind == "linear":
        return nn.Linear(key[1], key[2]), torch.randn(batch, key[1])
    if kind == "relu1d":
        return nn.ReLU(), torch.randn(batch, key[1])
    raise ValueError(f"unknown layer key {key}")


class LatencyPredictor:
    """Whole-model latency of CNN architectures from a per-layer table, for one batch size and thread count."""

    def __init__(self, batch: int, threads: int | None = None, min_time_s: float = 0.05) -> None:
        self.batch, self.threads, self.min_time_s = batch, threads, min_time_s
        self.table = LatencyTable(costs={}, feeds={}, batch=batch, threads=threads)
        self.coef = np.array([1.0, 1.0, 0.0])  # predict = coef . (conv ms, other ms, 1)

    def layer_ms(self, key: Key) -> float:
        if key not in self.table.costs:
            module, x = layer_module(key, self.batch)
            lat = measure_latency(module.eval(), (x,), threads=self.threads, min_time_s=self.min_time_s, warmup=2)
            self.table.costs[key] = LeafCost((1.0,), ((lat.p50_ms,),))
        return self.table.ms(key)

    def measure(self, archs: Sequence[CNNArch], rounds: int = 5, min_time_s: float = 0.02) -> LatencyPredictor:
        """Time every layer of ``archs`` not yet in the table: median of ``rounds`` interleaved rounds."""
        fns = {}
        for key in dict.fromkeys(k for a in archs for k in layer_keys(a)):
            module, x = layer_module(key, self.batch)
            fns[key] = (lambda m=module.eval(), x=x: m(x))
        self.table.time_layers(fns, rounds=rounds, min_time_s=min_time_s)
        return self

    def raw_ms(self, arch: CNNArch) -> float:
        return sum(self.layer_ms(k) for k in layer_keys(arch))

    def _features(self, arch: CNNArch) -> list[float]:
        """(conv ms, other layers ms, 1): convs and memory-bound layers drift differently inside a model."""
        conv = sum(self.layer_ms(k) for k in layer_keys(arch) if k[0] == "conv")
        return [conv, self.raw_ms(arch) - conv, 1.0]

    def predict(self, arch: CNNArch) -> float:
        return float(np.dot(self.coef, self._features(arch)))

    def fit(self, archs: Sequence[CNNArch], measured_ms: Sequence[float]) -> LatencyPredictor:
        """Non-negative least squares ``measured = a * conv + b * other + c`` over measured whole models,
        each row divided by its measurement (the error that counts is relative); with fewer than 4
        models the plain sum is scaled to the measured total."""
        from scipy.optimize import nnls  # heavy, imported when used (scipy)

        x = np.array([self._features(a) for a in archs])
        y = np.asarray(measured_ms, dtype=np.float64)
        if len(archs) >= 4:
            self.coef = nnls(x / y[:, None], np.ones_like(y))[0]
        else:
            self.coef = np.array([1.0, 1.0, 0.0]) * float(y.sum() / x[:, :2].sum())
        return self

    def error(self, archs: Sequence[CNNArch], measured_ms: Sequence[float]) -> dict[str, float]:
        """Mean and max relative error |predicted - measured| / measured on ``archs``."""
        rel = np.array([abs(self.predict(a) - m) / m for a, m in zip(archs, measured_ms)])
        return {"mean_rel_error": float(rel.mean()), "max_rel_error": float(rel.max()), "n": int(rel.size)}


def measure_archs(archs: Sequence[CNNArch], batch: int, threads: int | None = None, rounds: int = 5,
                  min_time_s: float = 0.05) -> list[float]:
    """Median ms of freshly built (random-weight) models at ``batch``, timed in ``rounds`` interleaved
    rounds (each model once per round), so load drift spreads over all of them alike."""
    x = {(a.in_channels, a.input_size): torch.randn(batch, a.in_channels, a.input_size, a.input_size) for a in archs}
    fns = {i: (lambda m=build(a).eval(), x=x[a.in_channels, a.input_size]: m(x)) for i, a in enumerate(archs)}
    times = time_calls(fns, threads, rounds, min_time_s)
    return [times[i] for i in range(len(archs))]


def measure_arch(arch: CNNArch, batch: int, threads: int | None = None, min_time_s: float = 0.2) -> float:
    """Measured p50 ms of a freshly built (random-weight) ``arch`` on a batch of ``batch``."""
    x = torch.randn(batch, arch.in_channels, arch.input_size, arch.input_size)
    return measure_latency(build(arch).eval(), (x,), threads=threads, min_time_s=min_time_s).p50_ms
