"""Intermediate features for FitNets-style distillation: forward hooks and learned projections.

``FeatureTaps`` records the output of named submodules on every forward pass (the first element
when a layer returns a tuple, as HF transformer layers do). ``projection`` maps a student feature
to the teacher's width: a 1x1 conv for (B, C, H, W) maps, a Linear on the last dim otherwise;
identity-initialised when the widths already agree (a pruned-then-regrown or factorized student
starts from "no correction").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError


class FeatureTaps:
    """``with FeatureTaps(model, names) as taps: model(x); taps.outputs[name]``."""

    def __init__(self, model: nn.Module, names: list[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise SlimkitError(f"distill features: the {role} has no layer {missing[0]!r}",
                               f"use names from {role}.named_modules(), e.g. {_examples(modules)}")
        self.modules = {n: modules[n] for n in names}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "FeatureTaps":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                raise SlimkitError(f"distill features: layer {name!r} returns {type(out).__name__}, not a tensor",
                                   "pick a layer whose output is a tensor")
            self.outputs[name] = out

        return record


def _examples(modules: dict[str, nn.Module]) -> str:
    names = [n for n in modules if n][:3]
    return ", ".join(names) or "(no submodules)"


def projection(student: torch.Tensor, teacher: torch.Tensor, pair: tuple[str, str]) -> nn.Module:
    """A trainable map from the student feature's shape to the teacher's."""
    if student.dim() != teacher.dim() or student.shape[0] != teacher.shape[0]:
        raise SlimkitError(f"distill features {pair}: student {tuple(student.shape)} and teacher "
                           f"{tuple(teacher.shape)} do not line up", "pair layers with the same kind of output")
    if student.dim() == 4:  # (B, C, H, W)
        if student.shape[2:] != teacher.shape[2:]:
            raise SlimkitError(f"distill features {pair}: spatial sizes {tuple(student.shape[2:])} and "
                               f"{tuple(teacher.shape[2:])} differ", "pair layers at the same resolution")
        proj: nn.Module = nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False)
    else:  # (B, C) or (B, T, C)
        if student.shape[1:-1] != teacher.shape[1:-1]:
            raise SlimkitError(f"distill features {pair}: shapes {tuple(student.shape)} and {tuple(teacher.shape)} "
                               "differ beyond the channel dim", "pair layers with matching token/spatial dims")
        proj = nn.Linear(student.shape[-1], teacher.shape[-1], bias=False)
    if student.shape[1 if student.dim() == 4 else -1] == teacher.shape[1 if teacher.dim() == 4 else -1]:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(proj.weight.shape[0]).reshape(proj.weight.shape))
    return proj.to(device=student.device, dtype=student.dtype)
