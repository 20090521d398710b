"""Half-precision casts (fp16 / bf16): the simplest precision change, 2x fewer bytes.

The model's floating-point parameters and buffers are stored in the half type and inputs are
cast on the way in, outputs back to float32 on the way out, so callers keep feeding float32.
Whether it is *faster* depends on the runtime (CPUs without native fp16 math are often slower);
the profiler measures that instead of assuming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, technique
from slimkit.core.record import StepRecord, add_record
from slimkit.core.task import Task


@technique("quantize.Float16", stage="quantize")
@dataclasses.dataclass(frozen=True)
class Float16(BaseConfig):
    """Store and run weights and activations in IEEE half precision."""

    #: sk.load applies the cast again: a state dict carries the dtypes but not the input/output casts.
    replay_on_load: ClassVar[bool] = True
    keep_norms_fp32: bool = False

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return cast_model(model, self, torch.float16)

    @classmethod
    def presets(cls) -> dict[str, BaseConfig]:
        return {"fp16": cls()}


@technique("quantize.BFloat16", stage="quantize")
@dataclasses.dataclass(frozen=True)
class BFloat16(BaseConfig):
    """Store and run weights and activations in bfloat16 (fp32's range, 8-bit mantissa)."""

    replay_on_load: ClassVar[bool] = True
    keep_norms_fp32: bool = False

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return cast_model(model, self, torch.bfloat16)

    @classmethod
    def presets(cls) -> dict[str, BaseConfig]:
        return {"bf16": cls()}


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def cast_model(model: nn.Module, config: Float16 | BFloat16, dtype: torch.dtype) -> nn.Module:
    kept = {n: "normalization kept in float32 (keep_norms_fp32)" for n, m in model.named_modules()
            if config.keep_norms_fp32 and isinstance(m, _NORMS)}
    add_record(model, StepRecord(config.type_name, config.to_dict(), kept))
    model.to(dtype)
    if config.keep_norms_fp32:
        for m in model.modules():
            if isinstance(m, _NORMS):
                m.float()
                m.register_forward_pre_hook(lambda _m, args: tuple(_to(a, torch.float32) for a in args))
                m.register_forward_hook(lambda _m, _a, out: _to(out, dtype))
    model.register_forward_pre_hook(lambda _m, args: tuple(_to(a, dtype) for a in args))
    model.register_forward_hook(lambda _m, _a, out: _to(out, torch.float32))
    return model


def _to(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value
