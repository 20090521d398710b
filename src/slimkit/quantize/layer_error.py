"""Per-layer quantization error: each quantized layer against its float original, in isolation.

Both layers see the *same* input (the float model's activation), so the number measures what
quantizing that layer alone costs, not the error accumulated from the layers before it.

An algorithm that changes how a layer is quantized (SmoothQuant, AWQ, cross-layer equalization,
bias correction, AdaRound) is judged per layer by :func:`layer_errors_before_after`: each row of the
model quantized with it also carries the SQNR of the same layer quantized without it ("before").
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Iterable

import torch
import torch.nn as nn

from slimkit.core.runtime_needs import quantized_layers
from slimkit.measure.closeness import sqnr_from_powers
from slimkit.quantize.extreme_modules import BitConv2d, BitLinear


@dataclasses.dataclass
class LayerError:
    name: str
    kind: str
    kernel: str
    sqnr_db: float
    #: SQNR of the worst output channel: a layer whose output is dominated by one huge channel
    #: can show a fine overall SQNR while every other channel is destroyed.
    worst_channel_sqnr_db: float
    max_abs: float
    mean_abs: float
    #: The same layer quantized without ``algorithm`` (SQNR and worst-channel SQNR, dB); None when not compared.
    sqnr_before_db: float | None = None
    worst_channel_sqnr_before_db: float | None = None
    algorithm: str | None = None
    #: A sample of signed output errors, for the histogram plot (not serialized).
    sample: torch.Tensor = dataclasses.field(repr=False, default_factory=lambda: torch.empty(0))

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d.pop("sample")
        return d


def layer_errors(float_model: nn.Module, quant_model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                 *, max_batches: int = 4, sample: int = 20000) -> list[LayerError]:
    """SQNR (dB), worst-channel SQNR, max and mean absolute error of every quantized layer.

    Sorted worst first by worst-channel SQNR, the number that exposes a destroyed channel.
    """
    pairs = _float_twins(float_model, quant_model)  # name -> (float layer, quantized layer)
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in pairs}
    hooks = [ref.register_forward_pre_hook(lambda _m, args, n=n: inputs[n].append(args[0].detach()))
             for n, (ref, _) in pairs.items()]
    try:
        float_model.eval()
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                if i >= max_batches:
                    break
                float_model(*batch)
    finally:
        for h in hooks:
            h.remove()
    rows = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, (ref_layer, q) in pairs.items():
            channel_dim = 1 if isinstance(ref_layer, nn.modules.conv._ConvNd) else -1  # (B, C, ...) or (..., C)
            signal = noise = 0.0
            ch_signal: torch.Tensor | float = 0.0
            ch_noise: torch.Tensor | float = 0.0
            max_abs, abs_sum, count, errs = 0.0, 0.0, 0, []
            for x in inputs[name]:
                ref, out = ref_layer(x).float(), q(x).float()
                diff = out - ref
                dims = [d for d in range(ref.dim()) if d != channel_dim % ref.dim()]
                ch_signal = ch_signal + ref.pow(2).sum(dims)  # (C,)
                ch_noise = ch_noise + diff.pow(2).sum(dims)  # (C,)
                err = diff.flatten()
                signal += float(ref.pow(2).sum())
                noise += float(err.pow(2).sum())
                max_abs = max(max_abs, float(err.abs().max()))
                abs_sum += float(err.abs().sum())
                count += err.numel()
                errs.append(err[torch.randperm(err.numel(), generator=gen)[:sample]])
            sqnr = sqnr_from_powers(signal, noise)
            worst = _worst_channel_db(ch_signal, ch_noise)
            rows.append(LayerError(name=name, kind=type(ref_layer).__name__, kernel=_kernel(q),
                                   sqnr_db=sqnr, worst_channel_sqnr_db=worst, max_abs=max_abs,
                                   mean_abs=abs_sum / max(count, 1),
                                   sample=torch.cat(errs)[:sample] if errs else torch.empty(0)))
    return sorted(rows, key=lambda r: r.worst_channel_sqnr_db)


def layer_errors_before_after(float_model: nn.Module, plain: nn.Module, improved: nn.Module,
                              batches: Iterable[tuple[torch.Tensor, ...]], *, algorithm: str,
                              float_improved: nn.Module | None = None, max_batches: int = 4) -> list[LayerError]:
    """``layer_errors`` of ``improved`` (quantized with ``algorithm``), each row with ``sqnr_before_db``: the
    same layer of ``plain`` (quantized the same way without it) against ``float_model``.

    ``float_improved``: the float model the algorithm quantized when it rescaled weights first (SmoothQuant,
    AWQ, CLE compute the same function with other weights; default ``float_model``). Rows are worst first
    after the algorithm; a layer only ``improved`` quantizes has no "before" (None).
    """
    batches = list(itertools.islice(batches, max_batches))  # read twice
    after = layer_errors(float_improved if float_improved is not None else float_model, improved, batches,
                         max_batches=max_batches)
    before = {r.name: r for r in layer_errors(float_model, plain, batches, max_batches=max_batches)}
    for row in after:
        row.algorithm = algorithm
        if row.name in before:
            row.sqnr_before_db = before[row.name].sqnr_db
            row.worst_channel_sqnr_before_db = before[row.name].worst_channel_sqnr_db
    return after


def stored_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer holding integer weights, by name: the ``QuantizedLayer`` protocol's (int8 / grouped int4)
    and the packed ``BitLinear`` / ``BitConv2d`` (int4 per output channel, as AdaRound and mixed precision
    store it, binary, ternary), which carry other buffers and so do not follow the protocol."""
    found = set(quantized_layers(model))
    found |= {n for n, m in model.named_modules() if isinstance(m, (BitLinear, BitConv2d))}
    return {n: m for n, m in model.named_modules() if n in found}  # in module order


#: Float layers of one input and one output tensor: any other module in their place is compared with them
#: (transposed convs and embedding tables stored in integers, fp16 layers). LSTM / GRU and
#: MultiheadAttention take or return several tensors and have no row.
ONE_TENSOR = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def _float_twins(float_model: nn.Module, quant_model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Each stored layer of ``quant_model`` (and each other layer that replaced a ``ONE_TENSOR`` float layer)
    with the float layer of ``float_model`` it replaced. A Conv1d the
    quantizer ran as a (k, 1) Conv2d (``name.conv`` inside a ``Conv1dAs2d``) is compared as the whole
    ``name``, whose input and output are the Conv1d's."""
    floats = dict(float_model.named_modules())
    quants = dict(quant_model.named_modules())
    replaced = {n: m for n, m in quants.items()
                if isinstance(floats.get(n), ONE_TENSOR) and type(m) is not type(floats[n])}
    pairs = {}
    for name, q in {**replaced, **stored_layers(quant_model)}.items():
        parent = name.rsplit(".", 1)[0] if name.endswith(".conv") else None
        if name not in floats and parent is not None and isinstance(floats.get(parent), nn.Conv1d):
            pairs[parent] = (floats[parent], quants[parent])
        elif name in floats:
            pairs[name] = (floats[name], q)
    return pairs


def _kernel(layer: nn.Module) -> str:
    kernel = getattr(layer, "kernel", None)
    if isinstance(kernel, str):
        return kernel
    inner = getattr(layer, "conv", None)  # a Conv1dAs2d around its quantized Conv2d
    if inner is not None and isinstance(getattr(inner, "kernel", None), str):
        return inner.kernel
    bits = getattr(layer, "bits", None)
    return f"{bits}-bit codes unpacked to float" if isinstance(layer, (BitLinear, BitConv2d)) else str(bits or "?")


def _worst_channel_db(signal: torch.Tensor | float, noise: torch.Tensor | float) -> float:
    if not isinstance(signal, torch.Tensor):
        return math.inf
    live = signal > 0  # an output channel that is always 0 in float carries no signal to lose
    if not live.any():
        return math.inf
    return float(sqnr_from_powers(signal[live], noise[live]).min())  # the worst live channel
