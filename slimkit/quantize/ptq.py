"""Post-training quantization handlers: calibrate once, swap layers for packed integer ones.

The result is a torch model whose quantized layers hold int8 / packed-int4 weights and scales
(``QuantLinear`` / ``QuantConv2d``). That model *is* the artifact; ``slimkit.runtime.build`` runs
it on torch kernels or exports it to ONNX Runtime's integer kernels.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch.nn as nn

from slimkit.config import register_handler
from slimkit.errors import SlimkitError
from slimkit.io import set_submodule
from slimkit.quantize.calibrate import collect, compute_range
from slimkit.quantize.configs import Int8, WeightOnly
from slimkit.quantize.embedding import QuantEmbedding
from slimkit.obs import task_hessians
from slimkit.quantize.gptq import gptq_int4
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.targets import select

log = logging.getLogger("slimkit.quantize")

#: An activation range wider than this is not a real activation (e.g. an additive attention mask
#: of -1e9 or -inf): quantizing it would give a useless scale, so that layer stays in float.
MAX_ABS_RANGE = 1e4


def quantize_int8(model: nn.Module, config: Int8, task: Any) -> nn.Module:
    names, skipped = _targets(model, config.targets, config.exclude, allow_conv=True)
    tables = _quantize_embeddings(model, config, skipped)  # first, so calibration sees the deployed tables
    ranges: dict[str, tuple[float, float]] = {}
    if config.activations == "static":
        calib = getattr(task, "calib", None) if task is not None else None
        if not calib:
            raise SlimkitError("static int8 needs calibration data and the task has none",
                               "pass a task with calib batches, or use activations='dynamic'")
        observers = collect(model, names, calib, which="input")
        for name in list(names):
            lo, hi = compute_range(observers[name], config.calibration, percentile=config.percentile,
                                   symmetric=config.symmetric, bits=8)
            if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_ABS_RANGE:
                skipped[name] = f"input range [{lo:.3g}, {hi:.3g}] is not a real activation range (mask-like)"
                names.remove(name)
            else:
                ranges[name] = (lo, hi)
    per_channel = config.granularity == "per_channel"
    originals = {name: model.get_submodule(name) for name in names}
    for name, layer in originals.items():
        if isinstance(layer, nn.Conv2d):
            q = QuantConv2d.from_float(layer, activations=config.activations, act_range=ranges.get(name),
                                       per_channel=per_channel, symmetric_act=config.symmetric)
        else:
            q = QuantLinear.from_float(layer, bits=8, group_size=0, activations=config.activations,
                                       act_range=ranges.get(name), per_channel=per_channel,
                                       symmetric_act=config.symmetric)
        set_submodule(model, name, q)
    return _finish(model, config, originals, skipped, task, tables)


def quantize_weight_only(model: nn.Module, config: WeightOnly, task: Any) -> nn.Module:
    names, skipped = _targets(model, config.targets, config.exclude, allow_conv=False)
    tables = _quantize_embeddings(model, config, skipped)
    originals = {}
    for name in names:
        layer = model.get_submodule(name)
        if config.group_size and layer.in_features % config.group_size:
            skipped[name] = f"in_features {layer.in_features} is not a multiple of group_size {config.group_size}"
            continue
        originals[name] = layer
    hessians = task_hessians(model, list(originals), task, "gptq", "rtn") if config.method == "gptq" else {}
    for name, layer in originals.items():
        int4 = gptq_int4(layer.weight, hessians[name], config.group_size) if name in hessians else None
        set_submodule(model, name, QuantLinear.from_float(layer, bits=config.bits, group_size=config.group_size,
                                                          activations="none", int4=int4))
    return _finish(model, config, originals, skipped, task, tables)


def _quantize_embeddings(model: nn.Module, config: Int8 | WeightOnly, skipped: dict[str, str]) -> list[str]:
    """Swap every ``nn.Embedding`` not in ``exclude`` for a ``QuantEmbedding``.

    int8 rows with a scale per row, or 4-bit groups of 32 when the config has ``embedding_bits=4``
    (configs without the field, e.g. ``QAT`` and ``Mixed``, keep int8).
    """
    bits = getattr(config, "embedding_bits", 8)
    if not config.embeddings:
        return []
    excluded = set(select(model, config.exclude, (), kinds=(nn.Module,))) if config.exclude else set()
    done = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Embedding) or any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        if m.max_norm is not None or m.sparse:
            skipped[name] = "an Embedding with max_norm or sparse gradients stays float"
            continue
        set_submodule(model, name, QuantEmbedding.from_float(m, bits=bits, name=name))
        done.append(name)
    return done


def _targets(model: nn.Module, targets: Any, exclude: Any, *, allow_conv: bool) -> tuple[list[str], dict[str, str]]:
    """Selected layer names, and the layers the selection named that we cannot quantize (with why)."""
    names = select(model, targets, exclude, kinds=(nn.Linear, nn.Conv2d, nn.Module))
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear) or (allow_conv and isinstance(m, nn.Conv2d) and _plain_conv(m)):
            chosen.append(name)
        elif isinstance(m, (nn.Linear, nn.Conv2d)) or not list(m.children()):
            skipped[name] = f"{type(m).__name__} is not supported by this technique"
    if not chosen:
        raise SlimkitError("no layer to quantize: targets matched no supported Linear/Conv2d layer",
                           "check targets/exclude ('all', 'all-linear', a regex or module names)")
    return chosen, skipped


def _plain_conv(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def _finish(model: nn.Module, config: Any, originals: dict[str, nn.Module], skipped: dict[str, str],
            task: Any, tables: list[str]) -> nn.Module:
    for name, reason in skipped.items():
        log.info("kept in float: %s (%s)", name, reason)
    model.slimkit_quant = {"config": config.to_dict(), "layers": list(originals), "skipped": dict(skipped),
                           "reverted": [], "embeddings": list(tables)}
    if config.max_drop is not None:
        from slimkit.quantize.accuracy import control

        control(model, originals, config, task)
    return model


register_handler(Int8, quantize_int8)
register_handler(WeightOnly, quantize_weight_only)
