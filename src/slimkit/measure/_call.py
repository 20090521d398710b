"""How a model is called for measurement: inputs, device, eval mode and thread count.

Every measurement calls the model the same way, so the numbers describe the same computation.
The model is put on the requested device and in eval mode for the measurement and put back
as it was afterwards: measuring never changes the caller's model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Union

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError

#: What a model is called with: one tensor, a tuple of positional inputs, or a dict of keyword inputs.
Example = Union[torch.Tensor, tuple, list, Mapping[str, Any]]


def as_call(example: Example) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Split ``example`` into ``(args, kwargs)``; a single tensor becomes a 1-tuple."""
    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    if isinstance(example, Mapping):
        return (), dict(example)
    raise SlimkitError(f"example inputs of type {type(example).__name__} are not supported",
                       "pass a tensor, a tuple of tensors, or a dict of keyword tensors")


def resolve_device(device: str | torch.device) -> torch.device:
    """Check that ``device`` is CPU or an available CUDA device."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SlimkitError(f"device {device!r} is not a valid device name", "use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimkitError(f"device {device!r} requested but CUDA is not available here",
                               "use device='cpu', or run on a machine with an NVIDIA GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise SlimkitError(f"device {device!r} is not supported for measurement", "use 'cpu' or 'cuda'")
    return dev


def require_module(model: Any, what: str) -> None:
    """``what`` needs an ``nn.Module`` (its parameters, submodules or hooks), not any callable."""
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"{what} needs a torch.nn.Module, got {type(model).__name__}",
                           "pass the model itself (measure_latency also accepts any callable)")


def device_for(model: Any, device: str | torch.device | None) -> torch.device:
    """``device`` checked, or (when ``None``) the device the model already lives on, else CPU."""
    if device is None:
        home = model_device(model) if isinstance(model, nn.Module) else None
        return resolve_device(home if home is not None else "cpu")
    return resolve_device(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock or memory reading covers it; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj`` (tensors, tuples, lists, dicts, HF ModelOutputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from tensors(v)


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj``."""
    return sum(t.numel() * t.element_size() for t in tensors(obj))


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters, buffers, packed quantized weights); shared tensors once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors(list(model.state_dict().values())):
        nbytes = t.numel() * t.element_size()
        key = (t.data_ptr(), nbytes)
        if nbytes and key not in seen:
            seen.add(key)
            total += nbytes
    return total


def describe(example: Example) -> list[str]:
    """Human-readable input shapes, e.g. ``['float32[1, 1, 28, 28]']``."""
    args, kwargs = as_call(example)
    named = [("", a) for a in args] + list(kwargs.items())
    out = []
    for name, value in named:
        text = (f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}" if isinstance(value, torch.Tensor)
                else type(value).__name__)
        out.append(f"{name}={text}" if name else text)
    return out


def model_device(model: nn.Module) -> torch.device | None:
    """The one device holding the model's tensors (``None`` if it has none)."""
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if len(devices) > 1:
        raise SlimkitError(f"the model is spread over several devices ({sorted(map(str, devices))})",
                           "move it to one device before measuring it")
    return next(iter(devices), None)


@contextlib.contextmanager
def prepared(model: Any, example: Example, device: torch.device) -> Iterator[tuple[tuple, dict]]:
    """Yield ``(args, kwargs)`` on ``device`` with ``model`` in eval mode on ``device``; restore both after.

    ``model`` may also be a plain callable, in which case only the inputs are moved.
    """
    args, kwargs = as_call(example)
    args, kwargs = to_device(args, device), to_device(kwargs, device)
    if not isinstance(model, nn.Module):
        yield args, kwargs
        return
    was_training = model.training
    home = model_device(model)
    if home is not None and home != device:
        model.to(device)
    model.eval()
    try:
        yield args, kwargs
    finally:
        model.train(was_training)
        if home is not None and home != device:
            model.to(home)


@contextlib.contextmanager
def pinned_threads(threads: int | None) -> Iterator[int]:
    """Run with ``torch.set_num_threads(threads)`` (default: the current count); restore it after."""
    before = torch.get_num_threads()
    if threads is not None and threads < 1:
        raise SlimkitError(f"threads={threads} is invalid", "use 1 or more threads, or None for the current count")
    use = before if threads is None else int(threads)
    torch.set_num_threads(use)
    try:
        yield use
    finally:
        torch.set_num_threads(before)
