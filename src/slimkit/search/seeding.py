"""The first trials are informed guesses, not random draws: built from the baseline's profile, the
target's ratios and per-layer sensitivity.

A size limit at a quarter of the original bytes says int8 fits; at an eighth, int4 with groups;
below that, pruning must remove parameters before quantizing. A latency limit below the original
asks for fewer MACs. Sensitivity says which layers to keep in float first.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch.nn as nn

from slimkit.core.registry import SearchContext, Technique
from slimkit.core.task import Task
from slimkit.measure.sensitivity import layer_sensitivity
from slimkit.train.recover import FINETUNE_STEPS

log = logging.getLogger("slimkit.search")

#: Bytes of a quantized model relative to fp32, roughly (scales and metadata included).
INT8_BYTES = 0.27
INT4_BYTES = 0.2   # 4-bit codes + a scale and zero point per group of 32 (~0.8 bytes per weight)
#: A pruned int4-everywhere CNN ran ~1.6x *slower* than the fp32 original on CPU (BENCHMARKS.md):
#: under a latency limit tighter than that, int8 goes first. Not ``<= 1.0``: a limit set to the
#: original's latency is measured again by the search and lands on either side of 1.0 by noise.
INT4_CPU_SLOWDOWN = 1.6


def _grid(x: float, lo: float, hi: float, step: float = 0.05) -> float:
    return round(min(hi, max(lo, round(x / step) * step)), 2)


def initial_guesses(ctx: SearchContext, techs: list[Technique]) -> list[dict[str, Any]]:
    """Parameter sets to enqueue before the sampler takes over (only knobs of techniques on offer)."""
    names = {t.search for t in techs if t.applies(ctx)}
    base = ctx.baseline
    size_ratio = ctx.target.max_size_mb / base["size_mb"] if ctx.target.max_size_mb else 1.0
    latency_ratio = ctx.target.max_latency_ms / base["latency_ms"] if ctx.target.max_latency_ms else 1.0
    skip = 1 if ctx.sensitivity else None
    guesses: list[dict[str, Any]] = []

    embeddings = ctx.has_embeddings()

    def quant(kind: str) -> dict[str, Any]:
        if kind in ("int8", "int8+int4-embeddings", "int8-static") and "int8" in names:
            p: dict[str, Any] = {"stage.quantize": "int8", "int8.activations": "dynamic"}
            if kind == "int8-static":  # integer convolutions too (ORT's dynamic Conv keeps them float)
                p.update({"int8.activations": "static", "int8.calibration": "minmax"})
            if skip is not None:
                p["int8.skip_sensitive"] = 0
            if embeddings:
                p["int8.embedding_bits"] = 4 if kind == "int8+int4-embeddings" else 8
            return p
        if kind == "int4-everywhere" and "mixed" in names:  # convolutions too (8-bit): weight-only skips them
            return {"stage.quantize": "mixed", "mixed.widths": "narrowest"}
        if kind in ("int4", "int4-everywhere") and "weight_only" in names:
            p = {"stage.quantize": "weight_only", "weight_only.bits": 4, "weight_only.group_size": 32}
            if getattr(ctx.task, "calib", None):
                p["weight_only.method"] = "gptq"  # the calibrated rounding: more accuracy at the same bytes
            if skip is not None:
                p["weight_only.skip_sensitive"] = skip
            return p
        return {}

    def pruned(keep: float, by: str) -> dict[str, Any]:
        """Channel pruning keeping about ``keep`` of the params (by width) or of the MACs."""
        if "channels" not in names:
            return {}
        if by == "width":  # a conv/linear pair loses params in both dimensions: keep ~ (1 - amount)^2
            p: dict[str, Any] = {"stage.prune": "channels", "channels.by": "width",
                                 "channels.amount": _grid(1 - math.sqrt(keep), 0.1, 0.8)}
        else:
            p = {"stage.prune": "channels", "channels.by": "macs", "channels.macs_ratio": _grid(keep, 0.15, 0.9)}
        p["channels.importance"] = "l2"
        if "finetune" in names:
            offered = sorted(ctx.extra.get("finetune_steps", FINETUNE_STEPS))
            p.update({"stage.recover": "finetune", "finetune.steps": offered[min(2, len(offered) - 1)]})
        return p

    # int8 (dynamic, on ONNX Runtime) is both the smallest safe step and the fastest CPU runtime
    if size_ratio >= INT8_BYTES:
        guesses.append(quant("int8"))
    if size_ratio >= INT4_BYTES and latency_ratio >= 0.9:  # int4 weight-only saves bytes, not CPU time
        guesses.append(quant("int4"))
    if INT4_BYTES <= size_ratio < INT8_BYTES:
        if embeddings:                                      # 4-bit tables: bytes without pruning or training
            guesses.append(quant("int8+int4-embeddings"))
        guesses.append({**pruned(size_ratio / INT8_BYTES * 0.9, "width"), **quant("int8")})  # or prune a little
    if size_ratio < INT4_BYTES:                             # bytes bind hard: prune, then int4
        keep = min(size_ratio / INT4_BYTES, latency_ratio) * 0.8  # 20 % slack for scales and metadata
        int4 = [{**pruned(keep, "width"), **quant("int4-everywhere")},
                {**pruned(keep * 0.7, "width"), **quant("int4-everywhere")}]
        if ctx.target.max_latency_ms and latency_ratio < INT4_CPU_SLOWDOWN:  # int4 dequantizes: prune more, int8
            int8 = {**pruned(size_ratio / INT8_BYTES * 0.8, "width"), **quant("int8-static")}
            int4 = [int8, *int4] if "channels" in names else int4
        guesses.extend(int4)
    elif latency_ratio < 0.5:                               # latency binds beyond int8's ~2x: cut MACs too
        guesses.append({**pruned(latency_ratio * 1.6, "macs"), **quant("int8")})
    stages = {t.stage for t in techs if t.applies(ctx)}
    unique = []
    for g in guesses:
        if not g:
            continue
        g = {**{f"stage.{s}": "none" for s in sorted(stages)}, **g}  # a stage a guess leaves out stays off
        used = [k for k, v in g.items() if k.startswith("stage.") and k != "stage.recover" and v != "none"]
        if ctx.max_techniques is not None and len(used) > ctx.max_techniques:
            continue
        if g not in unique:
            unique.append(g)
    log.info("seeding the search with %d informed guesses", len(unique))
    return unique


def layer_sensitivity_for(task: Task, max_layers: int = 12) -> dict[str, float]:
    """Metric drop per layer when only that layer's weights go to int4 (the largest ``max_layers`` layers)."""

    sized = sorted(((n, m.weight.numel()) for n, m in task.model.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv2d))), key=lambda kv: -kv[1])
    layers = [n for n, _ in sized[:max_layers]]
    return dict(layer_sensitivity(task.model, task, kind="quantize", bits=4, layers=layers))
