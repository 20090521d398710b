"""The ``cuda`` backend: a quantized or 2:4-sparse model rebuilt from modules that run real GPU kernels.

``build_cuda(model, scheme)`` replaces every Linear by the module of its scheme
(``runtime.cuda_kernels``): int8 weights x int8 activations (``torch._int_mm``), int4 weight-only
(tinygemm ``_weight_int4pack_mm``), fp8 e4m3 with row-wise scales (``torch._scaled_mm``), 2:4
semi-structured sparsity (cuSPARSELt / CUTLASS), or plain bf16. Everything else runs in bf16.

``scheme="auto"`` follows the model: slimkit ``QuantLinear`` int8 (dynamic or static activations)
-> int8, int4 -> int4 (the layer's own integers and group size), Linear weights that are already
2:4 sparse -> 2:4, others bf16. A named scheme applies to every float Linear (not ``exclude``d).

Every layer is checked once after building: its output on a fixed random input against the float
weight's output in fp32 (SQNR, in ``layers``). A layer whose kernel cannot run (shape, compute
capability, torch version: ``cuda_kernels.blocker``), fails, or falls under the scheme's SQNR
floor (a wrong layout, not a quantization error: see ``SQNR_FLOOR_DB``) keeps a bf16 weight;
the build logs one line for it and lists it in ``skips`` as ``(layer, scheme, reason)``.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.runtime_needs import QuantizedLayer
from slimkit.measure.closeness import sqnr_db
from slimkit.runtime import cuda_kernels as ck

log = logging.getLogger("slimkit.runtime")

SCHEMES = ("auto", *ck.SCHEMES)
#: Lowest SQNR (dB, random Gaussian input, against the float weight in fp32) a kernel's layer may show.
#: Correct kernels measure far above these on such inputs (int8 ~39 dB, fp8 ~28, int4 g128 ~20, 2:4
#: and bf16 > 40); a mis-packed weight gives about 0 dB, so falling below means "do not use it".
SQNR_FLOOR_DB = {"bf16": 30.0, "int8": 25.0, "fp8": 18.0, "int4": 10.0, "2:4": 30.0}
PROBE_ROWS = 32


class Skip(NamedTuple):
    """A layer that did not get its scheme's kernel, and why (one line)."""

    layer: str
    scheme: str
    reason: str


class CudaModel(nn.Module):
    """The rebuilt model on its device. Inputs are moved there (float ones cast to bf16, as the model
    now runs in bf16); outputs stay on the device, in bf16.

    ``layers``: per converted layer ``{"scheme", "kernel", "sqnr_db"}``; ``skips``: list of ``Skip``.
    """

    def __init__(self, model: nn.Module, device: torch.device, scheme: str, layers: dict[str, dict[str, Any]],
                 skips: list[Skip]) -> None:
        super().__init__()
        self.model = model.eval()
        self.device, self.scheme = device, scheme
        self.layers, self.skips = layers, skips

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(_to(a, self.device) for a in args)
        kwargs = {k: _to(v, self.device) for k, v in kwargs.items()}
        with torch.inference_mode():
            return self.model(*args, **kwargs)

    def summary(self) -> dict[str, Any]:
        """Plain data for reports: device, scheme, kernel count per scheme, every skip and each layer's SQNR."""
        counts: dict[str, int] = {}
        for info in self.layers.values():
            counts[info["scheme"]] = counts.get(info["scheme"], 0) + 1
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": name, "scheme": self.scheme, "layers_per_scheme": counts,
                "skips": [s._asdict() for s in self.skips], "layers": self.layers}


def _to(value: Any, device: torch.device) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, ck.OUT_DTYPE) if value.is_floating_point() else value.to(device)


def build_cuda(model: nn.Module, scheme: str = "auto", *, device: str | torch.device = "cuda",
               group_size: int = 128, exclude: tuple[str, ...] | str = (), check: bool = True,
               inplace: bool = False, int4_prefill_rows: int | None = None) -> CudaModel:
    """``model`` rebuilt on ``device`` with ``scheme``'s kernels (see the module docstring).

    ``group_size``: int4 group for float Linears. ``exclude``: Linear names, or a regex, run in bf16.
    ``int4_prefill_rows``: int4 layers also keep their plain nibbles and run calls of more rows than
    this on a per-call dequantized bf16 weight (tinygemm is a decode kernel; see ``Int4Linear``).
    ``check``: run the per-layer SQNR check. ``inplace``: convert ``model`` itself (for models too
    large to copy). ``device="cpu"`` runs torch's CPU kernels for the same math (tests).
    """
    if scheme not in SCHEMES:
        raise SlimkitError(f"scheme {scheme!r} is not a CUDA backend scheme", f"use one of {', '.join(SCHEMES)}")
    dev = _device(device)
    if not isinstance(model, nn.Module):
        raise SlimkitError(f"the cuda backend needs a torch.nn.Module, got {type(model).__name__}")
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    layers: dict[str, dict[str, Any]] = {}
    skips: list[Skip] = []
    for name, layer in list(work.named_modules()):
        if _is_quant_conv(layer):
            set_submodule(work, name, layer.to_float())
            skips.append(Skip(name, "int8", "no int8 convolution kernel on the cuda backend; runs bf16"))
            log.warning("cuda backend: %s stays bf16 instead of int8: %s", name, skips[-1].reason)
            continue
        plan = _plan(name, layer, scheme, exclude, int4_prefill_rows)
        if plan is None:
            continue
        wanted, float_weight, make = plan
        group = getattr(layer, "group_size", 0) or group_size  # a QuantLinear's own int4 groups
        why = ck.blocker(wanted, float_weight.shape[0], float_weight.shape[1], dev, group) \
            if wanted in ck.SCHEMES else None
        if wanted == "2:4" and why is None and not _is_24(float_weight):
            why = "weight is not 2:4 sparse (prune it with prune.NM(2, 4) first)"
        new, why = _build_layer(wanted, float_weight, layer, make, dev, group_size, why, check, int4_prefill_rows)
        if why is not None:
            skips.append(Skip(name, wanted, why))
            log.warning("cuda backend: %s stays bf16 instead of %s: %s", name, wanted, why)
        set_submodule(work, name, new)
        layers[name] = {"scheme": new.scheme, "kernel": new.kernel, "sqnr_db": getattr(new, "sqnr_db", None)}
    _cast_rest(work, dev, ck.OUT_DTYPE)
    log.info("cuda backend: %d layers on %s, %d kept bf16", len(layers), dev, len(skips))
    return CudaModel(work, dev, scheme, layers, skips)


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SlimkitError("the cuda backend needs a CUDA GPU and none is available here",
                               "run on a machine with an NVIDIA GPU (device='cpu' runs the same math for tests)")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    if dev.type != "cpu":
        raise SlimkitError(f"device {device!r} is not supported by the cuda backend", "use 'cuda' (or 'cpu' for tests)")
    return dev


def _is_quant_conv(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLayer) and layer.runtime_needs().op == "conv2d"


def _excluded(name: str, exclude: tuple[str, ...] | str) -> bool:
    if isinstance(exclude, str):
        return bool(exclude) and re.fullmatch(exclude, name) is not None
    return name in exclude


def _plan(name: str, layer: nn.Module, scheme: str, exclude: tuple[str, ...] | str,
          int4_prefill_rows: int | None = None) -> tuple[str, torch.Tensor, Any] | None:
    """(scheme wanted, the float (N, K) weight it stands for, a builder or None) for a layer to convert."""
    if isinstance(layer, QuantizedLayer) and layer.runtime_needs().op == "linear":
        needs = layer.runtime_needs()
        w = layer.dequantized_weight()
        if needs.weight_bits == 4:
            return "int4", w, lambda dev: ck.Int4Linear(layer.qweight, layer.weight_scale, layer.weight_zero,
                                                         layer.bias, dev, int4_prefill_rows)
        if needs.activations == "none":
            return "int8-weight-only", w, None
        return "int8", w, lambda dev: ck.Int8Linear(layer.qweight, layer.weight_scale, layer.bias, dev)
    if not isinstance(layer, nn.Linear):
        return None
    w = layer.weight.detach()
    if isinstance(layer, nn.modules.linear.NonDynamicallyQuantizableLinear) and scheme not in ("auto", "bf16"):
        return "attention-out-proj", w, None
    if _excluded(name, exclude):
        return "bf16", w, None
    if scheme == "auto":
        return ("2:4" if _is_24(w) else "bf16"), w, None
    return scheme, w, None


def _is_24(w: torch.Tensor) -> bool:
    if w.dim() != 2 or w.shape[1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()) and bool((w != 0).any())


def _build_layer(wanted: str, weight: torch.Tensor, layer: nn.Module, make: Any, dev: torch.device,
                 group_size: int, why: str | None, check: bool,
                 int4_prefill_rows: int | None = None) -> tuple[ck._KernelLinear, str | None]:
    """The scheme's module, or a bf16 one and the reason; with ``sqnr_db`` set when checked."""
    bias = getattr(layer, "bias", None)
    if wanted == "int8-weight-only":
        why = "weight-only int8 has no CUDA kernel in slimkit (int4 or int8 activations do)"
    elif wanted == "attention-out-proj":
        why = "nn.MultiheadAttention reads this weight directly, not through a kernel module; it runs bf16"
    if why is None:
        try:
            new = make(dev) if make is not None else ck.make_linear(wanted, weight, bias, dev, group_size,
                                                                     int4_prefill_rows)
            if check:
                new.sqnr_db = _sqnr(new, weight, bias, dev)
                floor = SQNR_FLOOR_DB[wanted]
                if not new.sqnr_db >= floor:
                    why = f"kernel output SQNR {new.sqnr_db:.1f} dB is below {floor:.0f} dB against the float weight"
            if why is None:
                return new, None
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            why = f"kernel failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}"
    fallback = ck.Bf16Linear(weight, bias, dev)
    if check:
        fallback.sqnr_db = _sqnr(fallback, weight, bias, dev)
    return fallback, why


@torch.no_grad()
def _sqnr(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, dev: torch.device) -> float:
    """Output SQNR on a random probe; a module with a second path for many rows (int4 prefill) is
    probed on both, and the worse counts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, weight.shape[1], generator=gen).to(dev, ck.OUT_DTYPE)  # (32, K)
    ref = F.linear(x.float(), weight.to(dev).float(), None if bias is None else bias.to(dev).float())  # (32, N)
    rows = getattr(module, "prefill_rows", None)
    probes = [PROBE_ROWS] if rows is None or rows >= PROBE_ROWS else [PROBE_ROWS, max(1, rows)]
    worst = float("inf")
    for m in probes:
        worst = min(worst, sqnr_db(ref[:m], module(x[:m])))
    return worst


def _cast_rest(model: nn.Module, dev: torch.device, dtype: torch.dtype) -> None:
    """Everything outside the kernel modules to ``dev``, floating tensors as ``dtype`` (kernel buffers untouched)."""
    for m in model.modules():
        if isinstance(m, ck._KernelLinear):
            continue
        for key, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[key] = nn.Parameter(p.detach().to(dev, dtype if p.is_floating_point() else None),
                                                  requires_grad=False)
        for key, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[key] = b.to(dev, dtype if b.is_floating_point() else None)


__all__ = ["SCHEMES", "SQNR_FLOOR_DB", "CudaModel", "Skip", "build_cuda"]
