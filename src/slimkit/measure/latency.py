"""Latency of one inference, timed on the device that will serve the model.

Each run is timed on its own so we can report percentiles (p95 is what a user waits for on a
bad request), not only a mean. CPU runs are timed with ``time.perf_counter``; CUDA runs with
CUDA events, synchronised after every run so each number is one complete request.

The number of runs adapts: we keep running until ``min_time_s`` has passed (and at least
``min_repeats`` runs), so a 50 us model gets thousands of runs and a 1 s model a handful.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch

from slimkit.core.errors import SlimkitError
from slimkit.measure._call import Example, pinned_threads, prepared, resolve_device, synchronize

K = TypeVar("K")


@dataclasses.dataclass(frozen=True)
class Latency:
    """Per-run latency statistics in milliseconds; ``cv`` is std/mean (0 = perfectly steady)."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    cv: float
    runs: int
    threads: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_latency(fn_or_model: Callable[..., Any], example: Example, device: str | torch.device = "cpu",
                    threads: int | None = None, warmup: int = 3, repeats: int | None = None,
                    min_time_s: float = 0.5, min_repeats: int = 5, max_repeats: int = 2000) -> Latency:
    """Time ``fn_or_model(*example)`` (a dict ``example`` is passed as keywords) under inference mode.

    ``threads`` pins ``torch.set_num_threads`` while timing (default: the current count) and is
    restored afterwards. ``warmup`` runs are untimed; they stop early once ``min_time_s`` has
    passed, after at least one. ``repeats`` fixes the number of timed runs; otherwise runs continue
    until ``min_time_s`` has passed and ``min_repeats`` are done, or ``max_repeats`` is reached.
    """
    if repeats is not None and repeats < 1:
        raise SlimkitError(f"repeats={repeats} is invalid", "use 1 or more repeats, or None to adapt")
    if warmup < 0 or min_time_s < 0 or min_repeats < 1 or max_repeats < 1:
        raise SlimkitError("warmup, min_time_s must be >= 0 and min_repeats, max_repeats >= 1",
                           "use the defaults unless you need otherwise")
    dev = resolve_device(device)
    with prepared(fn_or_model, example, dev) as (args, kwargs), pinned_threads(threads) as used, \
            torch.inference_mode():
        def call() -> None:
            fn_or_model(*args, **kwargs)

        start = time.perf_counter()
        for _ in range(warmup):
            call()
            synchronize(dev)
            if time.perf_counter() - start >= min_time_s:
                break
        times_ms = _timed_runs(call, dev, repeats, min_time_s, min_repeats, max_repeats)

    times = np.asarray(times_ms, dtype=np.float64)
    p50, p95 = np.percentile(times, [50, 95])
    mean = float(times.mean())
    cv = float(times.std() / mean) if mean > 0 else 0.0
    return Latency(p50_ms=float(p50), p95_ms=float(max(p95, p50)), mean_ms=mean, cv=cv, runs=len(times_ms),
                   threads=used, device=str(dev))


def _timed_runs(call: Callable[[], None], dev: torch.device, repeats: int | None, min_time_s: float,
                min_repeats: int, max_repeats: int) -> list[float]:
    """Milliseconds of each timed run."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(_cuda_run_ms(call, dev) if dev.type == "cuda" else _cpu_run_ms(call))
        n = len(times)
        if repeats is not None:
            if n >= repeats:
                return times
        elif n >= max_repeats or (n >= min_repeats and time.perf_counter() - start >= min_time_s):
            return times


def _cpu_run_ms(call: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def _cuda_run_ms(call: Callable[[], None], dev: torch.device) -> float:
    # Events are recorded on the current stream; wait for the end event so the run is complete.
    with torch.cuda.device(dev):
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        call()
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end))


def median_call_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``runs`` calls of ``fn`` in ms: a quick comparison, not a full measurement."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def interleaved_samples(fns: Mapping[K, Callable[[], Any]], *, rounds: int, min_time_s: float,
                        warmup: int = 2, clock: Callable[[], float] = time.perf_counter) -> dict[K, list[float]]:
    """ms per call of every function in each of ``rounds`` alternating rounds, after ``warmup`` calls each.

    Alternating (A B C A B C ...) instead of (A A A B B B ...) spreads a shared machine's noise over
    all contenders alike, so their *ratios* stay meaningful. A round repeats a function until
    ``min_time_s`` has passed. ``clock`` (seconds) is injectable for tests.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[K, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            n, start = 0, clock()
            while True:
                fn()
                n += 1
                elapsed = clock() - start
                if elapsed >= min_time_s:
                    break
            samples[k].append(elapsed / n * 1e3)
    return samples
