"""Peak memory of one inference: the weights, the inputs and the most activation memory alive at once.

On CUDA the caching allocator keeps the peak for us (``max_memory_allocated``). On CPU there is
no such counter, so we record the allocator's events with the autograd profiler and replay them
in time order: the running sum of allocations minus frees, at its maximum, is the peak of live
activation memory during the forward pass.

What CPU numbers cannot see: scratch memory that oneDNN/BLAS allocate outside the PyTorch
allocator, and allocator fragmentation. They are a floor on what the process needs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.autograd import DeviceType
from torch.autograd.profiler import profile

from slimkit.measure._call import Example, prepared, require_module, resolve_device, state_bytes, tensor_bytes


def peak_memory(model: nn.Module, example: Example, device: str | torch.device = "cpu") -> int:
    """Peak bytes held during one ``model(*example)``: parameters + buffers + inputs + live activations."""
    require_module(model, "peak_memory")
    dev = resolve_device(device)
    if dev.type == "cuda":
        return _cuda_peak(model, example, dev)
    with prepared(model, example, dev) as (args, kwargs):
        resident = state_bytes(model) + tensor_bytes(args) + tensor_bytes(kwargs)
        return resident + _cpu_activation_peak(model, args, kwargs)


def _cpu_activation_peak(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Largest running sum of CPU allocations minus frees during one forward pass."""
    # torch.autograd.profiler rather than torch.profiler.profile: the latter imports torch._inductor
    # on first use, which costs seconds and nothing here needs it.

    prof = profile(use_cpu=True, profile_memory=True, use_kineto=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        with torch.inference_mode():
            model(*args, **kwargs)
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    deltas = _memory_deltas(prof)
    live = peak = 0
    for _, nbytes in sorted(deltas):
        live += nbytes
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 while the profiler starts and stops.

    Kineto writes "USDT ... profiler_start/stop" lines to stderr from C++ on every start and stop;
    they mean nothing to a user reading a profile. Only the start and stop are silenced, never the
    model's forward, so real warnings still show.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _memory_deltas(prof: object) -> list[tuple[int, int]]:
    """``(time, +bytes allocated / -bytes freed)`` of every CPU allocator event."""
    results = getattr(prof, "kineto_results", None)
    if results is not None and hasattr(results, "events"):
        return [(e.start_ns(), int(e.nbytes())) for e in results.events()
                if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    # Older or stripped builds: allocations are attributed to the op that made them. Self memory
    # excludes children, so the ops' self bytes plus the stray "[memory]" frees cover every event.
    deltas = []
    for e in prof.function_events:  # type: ignore[attr-defined]
        nbytes = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if nbytes:
            deltas.append((e.time_range.start, int(nbytes)))
    return deltas


def _cuda_peak(model: nn.Module, example: Example, dev: torch.device) -> int:
    """Resident bytes plus the rise of ``max_memory_allocated`` over one forward, from a fresh peak.

    Counting the rise (not the absolute peak) keeps other tensors on the same GPU out of the number,
    so CPU and CUDA peaks mean the same thing.
    """
    with prepared(model, example, dev) as (args, kwargs):
        resident = state_bytes(model) + tensor_bytes(args) + tensor_bytes(kwargs)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            model(*args, **kwargs)
        torch.cuda.synchronize(dev)
        return resident + max(int(torch.cuda.max_memory_allocated(dev)) - before, 0)

