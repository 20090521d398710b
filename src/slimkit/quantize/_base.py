"""What QuantLinear and QuantConv2d share: activation quantization, kernel probing, buffer filling."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.runtime_needs import LayerNeeds
from slimkit.formats import pack
from slimkit.quantize import _kernels

ACTIVATIONS = ("none", "dynamic", "static")


class _Cache(dict):
    """Repacked weights: never saved, never deep-copied (ScriptObjects do not copy); rebuilt on use."""

    def __deepcopy__(self, memo: dict) -> _Cache:
        return _Cache()

    def __reduce__(self) -> tuple:
        return (_Cache, ())


def _drop_cache(module: _QuantBase, _incompatible: Any) -> None:
    module.reset_cache()  # a plain function, not a lambda, so the module stays picklable


class _QuantBase(nn.Module):
    """Activation handling and bookkeeping shared by QuantLinear and QuantConv2d."""

    def _init_act(self, activations: str, symmetric_act: bool) -> None:
        if activations not in ACTIVATIONS:
            raise SlimkitError(f"activations={activations!r} is not supported", f"use one of {ACTIVATIONS}")
        self.activations, self.symmetric_act = activations, bool(symmetric_act)
        self.act_qmin, self.act_qmax = pack.act_qrange(self.symmetric_act)
        if activations == "static":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32))
            self.register_buffer("act_zero", torch.zeros((), dtype=torch.int32))
        self._cache = _Cache()
        self.register_load_state_dict_post_hook(_drop_cache)

    def reset_cache(self) -> None:
        """Drop repacked weights (call after editing buffers in place)."""
        self._cache.clear()

    def _set_act_range(self, act_range: tuple[float, float] | None) -> None:
        if self.activations == "static":
            if act_range is None:
                raise SlimkitError("static activations need a calibrated act_range=(lo, hi)",
                                   "calibrate first, or use activations='dynamic'")
            scale, zero = pack.act_qparams(*act_range, symmetric=self.symmetric_act)
            self.act_scale.copy_(scale)
            self.act_zero.copy_(zero)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the integers stand for: code that reads ``layer.weight`` (its dtype, HF
        models' input casts) keeps working; the stored form stays the packed integers."""
        return self.dequantized_weight()

    def runtime_needs(self) -> LayerNeeds:
        """What a runtime must provide to run this layer (``slimkit.core.runtime_needs``)."""
        unsupported: dict[str, str] = {}  # weight-only runs on ONNX Runtime too (runtime.onnx_nbits)
        op = "conv2d" if isinstance(self, nn.Conv2d) or hasattr(self, "kernel_size") else "linear"
        if op == "conv2d":
            unsupported["cuda"] = "quantized convolutions have no CUDA kernel in slimkit (Linear layers only)"
        return LayerNeeds(op=op, weight_bits=int(getattr(self, "bits", 8)), group_size=int(getattr(self, "group_size", 0)),
                          activations=self.activations, per_channel=bool(getattr(self, "per_channel", True)),
                          symmetric_activations=self.symmetric_act, unsupported=unsupported)

    def act_range(self) -> tuple[float, float]:
        """The static activation range, as ``(lo, hi)`` that reproduces ``act_scale``/``act_zero`` exactly."""
        if self.activations != "static":
            raise SlimkitError(f"a layer with activations={self.activations!r} has no calibrated range")
        return pack.act_range_of(self.act_scale, self.act_zero, self.symmetric_act)

    def _fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """The activations an integer kernel would see: static params, or per-batch uint8 for dynamic
        (8-bit, as ONNX Runtime's DynamicQuantizeLinear; fbgemm uses 7 bits without VNNI)."""
        if self.activations == "static":
            return pack.fake_quant_act(x, self.act_scale, self.act_zero.float(), self.act_qmin, self.act_qmax)
        if self.activations == "dynamic":
            scale, zero = pack.dynamic_act_qparams(x, 255)
            return pack.fake_quant_act(x, scale, zero, 0, 255)
        return x

    def _quant_u8(self, x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """x as uint8 for the oneDNN kernels: static params (int8 shifted by 128) or per-batch."""
        if self.activations == "static":
            shift = 128 if self.symmetric_act else 0
            zero = int(self.act_zero) + shift
            u = pack.quantize_act(x, self.act_scale, self.act_zero.float(), self.act_qmin, self.act_qmax) + shift
            return u.to(torch.uint8), float(self.act_scale), zero
        qmax = _kernels.dynamic_qmax()
        scale, zero = pack.dynamic_act_qparams(x, qmax)
        u = pack.quantize_act(x, scale, zero, 0, qmax)
        return u.to(torch.uint8), float(scale), int(zero)

    def _choose(self, candidates: list[tuple[str, Callable[[], Any]]], fallback: str) -> None:
        """Take the first kernel whose probe runs; otherwise ``fallback`` with the reasons why not."""
        reasons = []
        for name, probe in candidates:
            try:
                with torch.no_grad():
                    probe()
                self.kernel, self.fallback_reason = name, None
                return
            except Exception as exc:  # noqa: BLE001  (any failure of an optional kernel: do not use it)
                reasons.append(f"{name}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]}")
        self.kernel, self.fallback_reason = fallback, "; ".join(reasons) or "no integer kernel for this layer"
        self.reset_cache()

    def _fill(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              act_range: tuple[float, float] | None, zero: torch.Tensor | None = None) -> _QuantBase:
        """Copy quantized weights (and bias, activation range) into the buffers; drop stale repacks."""
        with torch.no_grad():
            self.qweight.copy_(q)
            self.weight_scale.copy_(scale)
            if zero is not None:
                self.weight_zero.copy_(zero)
            if self.bias is not None:
                self.bias.copy_(bias.detach().float())
            self._set_act_range(act_range)
        return self._finish()

    def _float_twin(self, module: nn.Module) -> nn.Module:
        with torch.no_grad():
            module.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def _scales(self, n: int) -> torch.Tensor:
        return self.weight_scale.float().expand(n).contiguous()  # (N,) also for a per-tensor (1,) scale

    def _finish(self) -> _QuantBase:
        self.reset_cache()  # probes at construction cached repacks of the all-zero weight
        return self.eval()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind") + f", kernel={self.kernel!r}"
