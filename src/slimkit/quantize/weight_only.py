"""``quantize.WeightOnly``: int8 or grouped int4 weights with float activations (round-to-nearest or GPTQ)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch.nn as nn

from slimkit.calibrate.blockwise import calibrate_blockwise
from slimkit.calibrate.obs import hessian_hooks, task_batches
from slimkit.core.config import BaseConfig, technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import each
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.quantize.awq import awq_offered, clip_weights, scale_and_fold
from slimkit.quantize.conv_transpose import quantize_conv_transpose, transposed_targets
from slimkit.quantize.gptq import gptq_int4
from slimkit.quantize.extreme_modules import int4_per_channel
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.multihead import attention_targets, quantize_attention
from slimkit.quantize.options import (
    PTQConfig,
    Targets,
    check_choice,
    embedding_bits_knob,
    skip_sensitive_knob,
)
from slimkit.quantize.ptq import finish, quantize_embeddings, target_layers
from slimkit.quantize.recurrent import RECURRENT, quantize_recurrent, recurrent_targets


@technique("quantize.WeightOnly", stage="quantize", search="weight_only")
@dataclasses.dataclass(frozen=True)
class WeightOnly(PTQConfig):
    """Int8 or int4 weights with float activations: the memory-bound (small batch) win.

    ``group_size`` scales each run of that many input weights separately (int4 needs it for
    accuracy); 0 means one scale per output channel. ``embeddings`` / ``embedding_bits``: quantized
    embedding tables (8 or 4 bits), as in ``Int8``. ``method``: ``"rtn"`` rounds each weight to the
    nearest level; ``"gptq"`` (4-bit only) rounds with GPTQ's error feedback from the task's
    calibration inputs (``quantize.gptq``): at int4 g32 it keeps MiniLM's embeddings at cosine 0.98
    to fp32 where round-to-nearest gives 0.97. ``"awq"`` / ``"awq+gptq"`` first scale each Linear's
    input columns by its activation-aware factors and fold the inverse into the LayerNorm or Linear
    before it (``quantize.awq``), then round to nearest / with GPTQ; a Linear with no foldable
    producer is rounded unscaled. Convolutions (Conv1d as (k, 1) Conv2d) take int8 per
    output channel or symmetric int4 per output channel (round to nearest; GPTQ is for Linear
    layers); LSTM / GRU gate matrices take the Linear form (``quantize.recurrent``).
    """

    LAYERS: ClassVar[tuple[type[nn.Module], ...]] = (*PTQConfig.LAYERS, *RECURRENT)

    targets: Targets = "all"
    bits: int = 8
    group_size: int = 0
    method: str = "rtn"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("bits", self.bits, (8, 4))
        check_choice("method", self.method, ("rtn", "gptq", "awq", "awq+gptq"))
        if self.method != "rtn" and self.bits != 4:
            raise SlimkitError(f"method={self.method!r} is for 4-bit weights here", "use bits=4, or method='rtn' for int8")
        check_choice("group_size", self.group_size, (0, 32, 64, 128, 256))
        if self.bits == 4 and self.group_size == 0:
            raise SlimkitError("4-bit weights need a group size", "use group_size=32, 64 or 128")
        if self.bits == 8 and self.group_size != 0:
            raise SlimkitError("8-bit weight-only quantization is per output channel", "use group_size=0")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return quantize_weight_only(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> WeightOnly:
        """int8 or grouped int4 weights; int4 rounds with GPTQ or to nearest when the task has
        calibration inputs (GPTQ costs a calibration pass, and buys accuracy at the same bytes).
        ``awq`` / ``awq+gptq`` are offered only where AWQ can fold its scales (``awq.awq_offered``:
        a model with LayerNorms, i.e. a transformer); elsewhere they would round like rtn / gptq
        at the cost of an extra scale search."""
        bits = trial.suggest_categorical("weight_only.bits", [8, 4])
        group = trial.suggest_categorical("weight_only.group_size", [32, 64, 128]) if bits == 4 else 0
        method = "rtn"
        if bits == 4 and ctx.has_calibration():
            methods = ["gptq", "rtn", "awq", "awq+gptq"] if awq_offered(ctx.task.model) else ["gptq", "rtn"]
            method = trial.suggest_categorical("weight_only.method", methods)
        return cls(bits=bits, group_size=group, targets="all", exclude=skip_sensitive_knob(trial, ctx, "weight_only"),
                   embedding_bits=embedding_bits_knob(trial, ctx, "weight_only"), method=method)

    @classmethod
    def presets(cls) -> dict[str, BaseConfig]:
        return {"w8": cls(bits=8), "w4": cls(bits=4, group_size=64)}



def quantize_weight_only(model: nn.Module, config: WeightOnly, task: Task | None, *,
                         blockwise: bool = True) -> nn.Module:
    """``config`` applied in place. GPTQ calibrates and rounds one repeated block at a time
    (``calibrate.blockwise``, each block calibrated on the already-rounded blocks' outputs), holding one
    block's Hessians; ``blockwise=False`` gathers every layer's Hessians in one pass first."""
    names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=True, recurrent=True)
    recurrent = recurrent_targets(model, config.targets, config.exclude)
    transposed = transposed_targets(model, config.targets, config.exclude)
    attention = attention_targets(model, config.targets, config.exclude)
    tables = quantize_embeddings(model, config, skipped)
    keep = config.max_drop is not None  # the float layers are kept only for accuracy control to restore
    originals: dict[str, nn.Module | None] = {}
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear) and config.group_size and layer.in_features % config.group_size:
            skipped[name] = f"in_features {layer.in_features} is not a multiple of group_size {config.group_size}"
            continue
        originals[name] = layer
    layer = None
    linears = [n for n, layer in originals.items() if isinstance(layer, nn.Linear)]
    hessians = {}
    done: set[str] = set()
    if config.method == "gptq" and linears:
        def round_block(block_hessians: dict) -> None:
            for name, h in block_hessians.items():  # each float weight freed once its int4 copy is made
                layer = model.get_submodule(name)
                int4 = gptq_int4(layer.weight, h, config.group_size)
                set_submodule(model, name, QuantLinear.from_float(layer, bits=config.bits, group_size=config.group_size,
                                                                  activations="none", int4=int4))
                originals[name] = layer if keep else None
                done.add(name)

        calibrate_blockwise(model, linears, task_batches(task, "gptq", "rtn"), hessian_hooks, round_block,
                            blocks=None if blockwise else [], label="GPTQ int4")
    if config.method.startswith("awq"):  # weights rescaled and folded in place; then rounded as usual
        gptq = config.method == "awq+gptq"
        scaled = scale_and_fold(model, linears, task, config.group_size, gptq=gptq)[0]
        if not gptq:  # clipping helps rounding to nearest; before GPTQ it cost MiniLM g128 0.9742 -> 0.9712
            clip_weights(model, scaled, config.group_size)
        hessians = scaled if gptq else {}
    todo = [n for n in originals if n not in done]
    for name in each(todo, f"rounding int{config.bits} weights ({config.method})"):
        layer = originals[name]
        if isinstance(layer, nn.Conv2d):  # per output channel (int4: symmetric levels -7..7), rounded to nearest
            new = int4_per_channel(layer) if config.bits == 4 else QuantConv2d.from_float(layer, activations="none")
        else:
            int4 = gptq_int4(layer.weight, hessians[name], config.group_size) if name in hessians else None
            new = QuantLinear.from_float(layer, bits=config.bits, group_size=config.group_size, activations="none",
                                         int4=int4)
        set_submodule(model, name, new)
        originals[name] = layer if keep else None
    layer = None  # this name must not keep the last float layer alive
    originals.update(quantize_recurrent(model, recurrent, skipped, bits=config.bits, group_size=config.group_size,
                                        activations="none"))
    originals.update(quantize_conv_transpose(model, transposed, config.bits, skipped))
    originals.update(quantize_attention(model, attention, config.bits, skipped))
    return finish(model, config, originals, skipped, task, tables)
