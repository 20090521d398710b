"""What the post-training quantizers share: which layers they take, embedding tables, the record.

The result of a PTQ handler is a torch model whose quantized layers hold int8 / packed-int4 weights
and scales (``QuantLinear`` / ``QuantConv2d``). That model *is* the artifact; ``slimkit.runtime.build``
runs it on torch kernels or exports it to ONNX Runtime's integer kernels.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from slimkit.core.editing import read_directly, select, set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import add_record
from slimkit.core.task import Task
from slimkit.quantize.accuracy import control
from slimkit.quantize.conv1d import liftable_reason, lift_conv1d
from slimkit.quantize.conv_transpose import transposed_targets
from slimkit.quantize.embedding import QuantEmbedding
from slimkit.quantize.recurrent import recurrent_targets
from slimkit.quantize.record import QuantRecord

log = logging.getLogger("slimkit.quantize")

#: An activation range wider than this is not a real activation (e.g. an additive attention mask
#: of -1e9 or -inf): quantizing it would give a useless scale, so that layer stays in float.
MAX_ABS_RANGE = 1e4


def quantize_embeddings(model: nn.Module, config: Any, skipped: dict[str, str]) -> list[str]:
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


def target_layers(model: nn.Module, targets: Any, exclude: Any, *, allow_conv: bool,
                  recurrent: bool = False) -> tuple[list[str], dict[str, str]]:
    """Selected layer names, and the layers the selection named that we cannot quantize (with why).

    ``recurrent``: the caller converts LSTM/GRU (and ConvTranspose) layers itself (``quantize.recurrent``,
    ``quantize.conv_transpose``), so a model whose only weight layers are those is not refused here."""
    names = select(model, targets, exclude, kinds=(nn.Linear, nn.Conv2d, nn.Module))
    if allow_conv and targets == "all":  # "all" names Linear/Conv2d; Conv1d layers go too, as (k, 1) Conv2d
        names += select(model, ".*", exclude, kinds=(nn.Conv1d,))
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    direct = read_directly(model)
    for name in names:
        m = model.get_submodule(name)
        if name in direct:
            skipped[name] = direct[name]
        elif isinstance(m, nn.Linear) or (allow_conv and isinstance(m, nn.Conv2d) and _plain_conv(m)):
            chosen.append(name)
        elif allow_conv and isinstance(m, nn.Conv1d):
            reason = liftable_reason(m)
            if reason:
                skipped[name] = reason
            else:
                chosen.append(lift_conv1d(model, name))
        elif isinstance(m, (nn.Linear, nn.Conv2d)) or not list(m.children()):
            skipped[name] = f"{type(m).__name__} is not supported by this technique"
    if targets in ("all", "all-linear"):  # weight layers "all" does not reach are listed, never silently float
        excluded = set(select(model, exclude, (), kinds=(nn.Module,))) if exclude else set()
        for name, m in model.named_modules():
            inside = any(name.startswith(c + ".") for c in chosen) or any(name == e or name.startswith(e + ".")
                                                                         for e in excluded)
            if isinstance(m, nn.modules.conv._ConvTransposeNd) and name not in skipped and not inside:
                skipped[name] = (f"{type(m).__name__}: no integer transposed-conv kernel on torch or ONNX Runtime, "
                                 "kept float (quantize.WeightOnly stores it int8/int4)")
            elif isinstance(m, nn.MultiheadAttention) and name not in skipped and not inside:
                skipped[name] = ("MultiheadAttention reads its projection weights directly: kept float "
                                 "(quantize.WeightOnly stores them int8/int4)")
            elif isinstance(m, UNQUANTIZED) and name not in skipped and not inside:
                skipped[name] = f"{type(m).__name__} is not quantized by this technique: kept float"
    if not chosen and not (recurrent and (recurrent_targets(model, targets, exclude)
                                          or transposed_targets(model, targets, exclude))):
        raise SlimkitError("no layer to quantize: targets matched no supported Linear/Conv1d/Conv2d/LSTM/GRU layer",
                           "check targets/exclude ('all', 'all-linear', a regex or module names)")
    return chosen, skipped


#: Weight layers no quantizer here converts yet (they are listed as kept float, with this reason).
UNQUANTIZED = (nn.Conv1d, nn.Conv3d, nn.modules.conv._ConvTransposeNd, nn.RNNBase, nn.RNNCellBase,
               nn.EmbeddingBag, nn.MultiheadAttention)


def _plain_conv(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def finish(model: nn.Module, config: Any, originals: dict[str, nn.Module], skipped: dict[str, str],
            task: Task, tables: list[str]) -> nn.Module:
    for name, reason in skipped.items():
        log.info("kept in float: %s (%s)", name, reason)
    add_record(model, QuantRecord(config.type_name, config.to_dict(), dict(skipped), layers=list(originals),
                                  embeddings=list(tables)))
    if config.max_drop is not None:
        control(model, originals, config, task)
    return model


