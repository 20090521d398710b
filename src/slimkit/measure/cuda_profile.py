"""GPU timing: CUDA events, CUDA-graph replay, the device's measured peaks, and roofline fractions.

A GPU call returns before its kernels finish, so wall-clock timing measures the launch, not the
work. Here every number comes from CUDA events recorded on the stream around the calls. Small
models are dominated by per-kernel launch cost; replaying a captured CUDA graph removes it, so
``cuda_latency`` times graph replays where the call can be captured (and says when it could not).

Peaks are *measured* on the device in this process (a large GEMM per precision, a large copy for
memory bandwidth), not taken from a datasheet, so "fraction of the limit" compares like with like:
``limit_ms = max(flops / peak_flops, bytes / peak_bandwidth)`` and ``fraction = limit_ms / measured_ms``.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from slimkit.measure.latency import Latency

PEAK_GEMM = 8192  # the square GEMM that measures compute peaks
PEAK_COPY_BYTES = 1 << 30  # 1 GiB copied (read + write) for the bandwidth peak


def graphed(fn: Callable[[], Any], warmup: int = 3) -> Callable[[], Any] | None:
    """``fn`` captured in a CUDA graph: a callable that replays it and returns the captured output.

    None when ``fn`` cannot be captured (host synchronisation, CPU tensors, dynamic shapes...).
    Warm-up runs on a side stream first, as capture requires (allocator and cuBLAS workspaces).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError:  # capture refused; the caller runs eagerly
        torch.cuda.synchronize()
        return None

    def replay() -> Any:
        graph.replay()
        return out

    replay.graph = graph  # type: ignore[attr-defined] - keeps the graph (and its memory pool) alive
    return replay


def time_ms(fn: Callable[[], Any], *, rounds: int = 7, min_round_ms: float = 20.0, warmup: int = 3) -> dict[str, float]:
    """Median milliseconds per call of ``fn`` over ``rounds`` rounds, each of enough calls to last
    ``min_round_ms``, timed by CUDA events around the round (per-call event cost amortised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, math.ceil(min_round_ms / max(begin.elapsed_time(end), 1e-3)))
    per_call = []
    for _ in range(rounds):
        begin.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        per_call.append(begin.elapsed_time(end) / calls)
    return {"median_ms": statistics.median(per_call), "min_ms": min(per_call), "max_ms": max(per_call),
            "calls_per_round": calls, "rounds": rounds}


def per_call_ms(fn: Callable[[], Any], *, min_time_s: float = 0.5, min_repeats: int = 10,
                max_repeats: int = 2000) -> list[float]:
    """Each call timed on its own by a pair of events (for percentiles), until ``min_time_s`` of GPU time."""
    times: list[float] = []
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    while len(times) < max_repeats and (len(times) < min_repeats or sum(times) < min_time_s * 1e3):
        starts[0].record()
        fn()
        starts[1].record()
        starts[1].synchronize()
        times.append(starts[0].elapsed_time(starts[1]))
    return times


def cuda_latency(call: Callable[[], Any], device: torch.device, *, min_time_s: float = 0.5,
                 graphs: bool = True) -> tuple[Any, str]:
    """(``measure.Latency`` of ``call()``, timing mode: "cuda-graph" or "eager (why)") on ``device``."""

    with torch.cuda.device(device), torch.inference_mode():
        run, mode = call, "eager"
        if graphs:
            replay = graphed(call)
            run, mode = (replay, "cuda-graph") if replay is not None else (call, "eager (graph capture refused)")
        for _ in range(3):
            run()
        times = np.asarray(per_call_ms(run, min_time_s=min_time_s), dtype=np.float64)
    p50, p95 = np.percentile(times, [50, 95])
    mean = float(times.mean())
    return Latency(p50_ms=float(p50), p95_ms=float(max(p95, p50)), mean_ms=mean, cv=float(times.std() / mean),
                   runs=len(times), threads=torch.get_num_threads(), device=str(device)), mode


@functools.lru_cache(maxsize=4)
def device_peaks(index: int = 0) -> dict[str, Any]:
    """Measured peaks of CUDA device ``index``: bf16/fp8/int8 GEMM TFLOP/s at 8192^3 and copy GB/s."""
    dev = torch.device("cuda", index)
    n = PEAK_GEMM
    with torch.cuda.device(dev), torch.inference_mode():
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        flops = 2 * n ** 3
        peaks: dict[str, Any] = {"device": torch.cuda.get_device_name(dev),
                                 "capability": list(torch.cuda.get_device_capability(dev))}
        peaks["bf16_tflops"] = flops / time_ms(lambda: a @ b)["median_ms"] / 1e9
        if torch.cuda.get_device_capability(dev) >= (8, 9):
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            sa, sb = torch.ones(n, 1, device=dev), torch.ones(1, n, device=dev)
            peaks["fp8_tflops"] = flops / time_ms(lambda: torch._scaled_mm(
                a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True))["median_ms"] / 1e9
        a_i8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
        b_i8 = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
        peaks["int8_tops"] = flops / time_ms(lambda: torch._int_mm(a_i8, b_i8.t()))["median_ms"] / 1e9
        del a, b, a_i8, b_i8
        src = torch.empty(PEAK_COPY_BYTES, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        peaks["hbm_gbps"] = 2 * PEAK_COPY_BYTES / time_ms(lambda: dst.copy_(src))["median_ms"] / 1e6
    torch.cuda.empty_cache()
    return peaks


def roofline(flops: float, nbytes: float, ms: float, peak_tflops: float, peak_gbps: float) -> dict[str, float | str]:
    """Achieved TFLOP/s and GB/s of a run and how close it came to the roofline limit of the device.

    ``limit_ms`` is the least time the device could take (compute or memory, whichever binds);
    ``fraction_of_limit`` = ``limit_ms / ms`` (1.0 = at the physical limit).
    """
    if ms <= 0 or peak_tflops <= 0 or peak_gbps <= 0:
        raise ValueError("time and peaks must be positive")
    compute_ms = flops / (peak_tflops * 1e9)
    memory_ms = nbytes / (peak_gbps * 1e6)
    limit_ms = max(compute_ms, memory_ms)
    return {"achieved_tflops": flops / ms / 1e9, "achieved_gbps": nbytes / ms / 1e6,
            "compute_fraction": compute_ms / ms, "bandwidth_fraction": memory_ms / ms,
            "bound": "compute" if compute_ms >= memory_ms else "memory", "limit_ms": limit_ms,
            "fraction_of_limit": limit_ms / ms, "peak_tflops": peak_tflops, "peak_gbps": peak_gbps}


def state_nbytes(model: torch.nn.Module) -> int:
    """Bytes of a model's weights as the kernels read them (a 2:4 layer's compressed values and metadata
    are its buffers); tensors sharing memory count once."""
    seen: set[tuple[str, int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def peak_key(model: Any) -> str:
    """Which measured compute peak a model's GEMMs run at: its dominant cuda-backend scheme, else bf16."""
    counts = model.summary()["layers_per_scheme"] if hasattr(model, "summary") and hasattr(model, "skips") else {}
    top = max(counts, key=counts.get) if counts else "bf16"
    return {"fp8": "fp8_tflops", "int8": "int8_tops"}.get(top, "bf16_tflops")


def model_roofline(model: Any, device: torch.device, flops: float, nbytes: float, ms: float) -> dict[str, Any]:
    """``roofline`` of one model run against this device's measured peaks (for ``measure.profile``)."""
    peaks = device_peaks(device.index or 0)
    key = peak_key(model)
    peak = peaks.get(key, peaks["bf16_tflops"])
    return {**roofline(flops, nbytes, ms, peak, peaks["hbm_gbps"]), "peak_kind": key, "device": peaks["device"],
            "bytes_counted": "model state + inputs + outputs (a lower bound on memory traffic)"}


__all__ = ["cuda_latency", "device_peaks", "graphed", "model_roofline", "per_call_ms", "peak_key", "roofline",
           "state_nbytes", "time_ms"]
