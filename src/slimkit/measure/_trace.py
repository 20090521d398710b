"""Forward hooks that record, per module, how often it ran, for how long and how many bytes it moved.

A "leaf" here is a module that ran and none of whose children ran: the unit a per-layer
breakdown can talk about. This is decided by what executes, not by the module tree, because
quantized modules keep their weights in child containers that are never called
(``Linear._packed_params``) and models often hold modules they never use.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.nn as nn

from slimkit.measure._call import synchronize, tensor_bytes


@dataclasses.dataclass
class ModuleTrace:
    """What one module did during the forward passes traced since the last ``reset``."""

    calls: int = 0
    seconds: float = 0.0  # wall time inside the module, children included
    io_bytes: int = 0  # bytes of its tensor inputs read plus tensor outputs written
    shape_macs: int = 0  # MACs implied by its shapes if it looks like a Linear or Conv, else 0


class Tracer:
    """Context manager hooking the modules of ``model``; hooks are removed on exit."""

    def __init__(self, model: nn.Module, device: torch.device, timed: bool = False,
                 only: set[str] | None = None) -> None:
        """``timed``: record only times (cheap hooks, GPU synchronised); ``only``: hook just these modules."""
        self.model = model
        self.device = device
        self.timed = timed
        self.names = {mod: name for name, mod in model.named_modules() if only is None or name in only}
        self.records: dict[str, ModuleTrace] = {}
        self._starts: dict[str, list[float]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> Tracer:
        for mod in self.names:
            self._handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(mod.register_forward_hook(self._post, with_kwargs=True))
        self.reset()
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.records = {name: ModuleTrace() for name in self.names.values()}
        self._starts = {name: [] for name in self.names.values()}

    def _pre(self, mod: nn.Module, inputs: tuple, kwargs: dict) -> None:
        if self.timed:
            synchronize(self.device)
        self._starts[self.names[mod]].append(time.perf_counter())

    def _post(self, mod: nn.Module, inputs: tuple, kwargs: dict, output: Any) -> None:
        if self.timed:
            synchronize(self.device)
        name = self.names[mod]
        rec = self.records[name]
        rec.seconds += time.perf_counter() - self._starts[name].pop()
        rec.calls += 1
        if not self.timed:  # keep timed hooks as light as possible
            rec.io_bytes += tensor_bytes(inputs) + tensor_bytes(kwargs) + tensor_bytes(output)
            rec.shape_macs += shape_macs(mod, inputs, output)

    def leaves(self) -> list[str]:
        """Names of modules that ran with no child that ran, in definition order."""
        called = [name for name, rec in self.records.items() if rec.calls > 0]
        has_called_child: set[str] = set()
        for name in called:
            if name:
                parts = name.split(".")
                has_called_child.update(".".join(parts[:i]) for i in range(len(parts)))
        return [name for name in called if name not in has_called_child]


#: Weight matrices per gate set: LSTM has 4 gates, GRU 3, a plain RNN 1.
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}


def recurrent_macs(mod: nn.Module, inputs: tuple) -> int:
    """MACs of an LSTM/GRU/RNN (per time step x steps x layers x directions) or one cell step; else 0.

    Each gate is ``W_ih x + W_hh h``: ``hidden * (input + hidden)`` MACs per sample and step.
    """
    gates = next((g for kind, g in _GATES.items() if isinstance(mod, kind)), 0)
    if not gates or not inputs or not isinstance(inputs[0], torch.Tensor):
        return 0
    x, hidden = inputs[0], mod.hidden_size
    if isinstance(mod, nn.RNNCellBase):
        batch = x.shape[0] if x.dim() == 2 else 1
        return batch * gates * hidden * (mod.input_size + hidden)
    if x.dim() == 3:
        batch, steps = (x.shape[0], x.shape[1]) if mod.batch_first else (x.shape[1], x.shape[0])
    else:  # unbatched (T, input)
        batch, steps = 1, x.shape[0]
    dirs = 2 if mod.bidirectional else 1
    per_step = sum(dirs * gates * hidden * ((mod.input_size if layer == 0 else dirs * hidden) + hidden)
                   for layer in range(mod.num_layers))
    return batch * steps * per_step


def shape_macs(mod: nn.Module, inputs: tuple, output: Any) -> int:
    """MACs a Linear-, Conv- or recurrent-shaped module must do, from its attributes and tensor shapes; else 0."""
    if isinstance(mod, (nn.RNNBase, nn.RNNCellBase)):
        return recurrent_macs(mod, inputs)
    if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
        return 0
    in_features = getattr(mod, "in_features", None)
    out_features = getattr(mod, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int) and out_features > 0:
        # output (..., out_features): each element is a dot product of length in_features
        return output.numel() * in_features
    in_ch, out_ch = getattr(mod, "in_channels", None), getattr(mod, "out_channels", None)
    kernel, groups = getattr(mod, "kernel_size", None), getattr(mod, "groups", 1)
    if isinstance(in_ch, int) and isinstance(out_ch, int) and kernel is not None and isinstance(groups, int):
        k = 1
        for size in (kernel if isinstance(kernel, (tuple, list)) else (kernel,)):
            k *= int(size)
        if getattr(mod, "transposed", False):
            # input (N, in_ch, *spatial): each element is scattered into out_ch/groups * k outputs
            return inputs[0].numel() * (out_ch // groups) * k
        # output (N, out_ch, *spatial): each element sums in_ch/groups * k products
        return output.numel() * (in_ch // groups) * k
    return 0
