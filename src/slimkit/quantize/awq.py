"""AWQ (Lin et al. 2024): activation-aware scaling of int4 weights before rounding.

A few input channels of a layer carry much larger activations than the rest, and the rounding
error of the weights that multiply them dominates the layer's output error. Multiplying those
weight columns by ``s_j > 1`` (and the layer's input by ``1 / s_j``) keeps the float function but
gives them a finer share of their group's int4 grid. Per group of Linears that read one input:
``s = a ** alpha`` from the per-input-channel activation magnitude ``a`` (the RMS, from the same
calibration pass that gives GPTQ its Hessian ``H = X^T X``; the paper uses mean |x|, which ranks
outlier channels alike), with ``alpha`` searched on 0, 0.1, .., 1 for the least output error
``tr(E H E^T)``, ``E = W - Q(W s) / s``, Q rounding to nearest. ``alpha = 0`` is plain rounding, so
the search never does worse on the calibration data. ``awq+gptq`` then rounds the scaled weights
with GPTQ (the returned Hessians are those of the scaled inputs).

Then, for ``awq`` (round to nearest; not before GPTQ, whose act-order error feedback does better on
the unclipped weights: MiniLM int4 g128 0.9742 vs 0.9712 with clipping), (``clip_weights``) AWQ's
weight clipping, for every target Linear (scaled or not): per output row and group the
range ``[-r m, r m]`` (``m`` the group's max |w|) with ``r`` in ``CLIP_RATIOS`` and the least output
error ``e_g H_gg e_g^T`` of that group (its block of the Hessian) is the one rounded. Clipping is
what reaches layers that no fold can scale (in post-norm BERT every Linear but value -> output).

``1 / s`` is folded into the op that produces the input (a LayerNorm's weight and bias, or the rows
of the Linear before it, also through a ReLU), so the artifact is plain slimkit int4 with no extra
op. Each fold is checked on a calibration batch with random scales first: where the candidate's
output also feeds something else (a residual, a GELU) the model's output changes and the layer is
rounded without scaling instead, with the reason logged and returned.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from slimkit.calibrate.obs import task_hessians
from slimkit.formats import pack

log = logging.getLogger(__name__)

ALPHAS = tuple(i / 10 for i in range(11))
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))  # 1.0 (no clipping) .. 0.55 of a group's max |w|
CANDIDATES = 3  # producers tried per group, nearest first in execution order
TOLERANCE = 1e-4  # a verified fold moves the model output by at most this, relative to its scale


def awq_offered(model: nn.Module) -> bool:
    """Whether the search offers AWQ on ``model``: it has LayerNorms (a transformer), where activation
    outliers live and scales fold into a norm or a value projection. A CNN's convs are rounded per
    output channel without AWQ, so there it would only add a scale search to every trial."""
    return any(isinstance(m, nn.LayerNorm) for m in model.modules())


def scale_and_fold(model: nn.Module, names: list[str], task: Any, group_size: int, *, gptq: bool
                   ) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, str]]:
    """Scale the named Linears' weight columns and fold ``1 / s`` into their producers, in place.

    The float model computes the same function afterwards; rounding its weights (to nearest, or with
    GPTQ and the returned Hessians of the now scaled inputs) gives AWQ. Returns ``(hessians, alpha
    per scaled layer, reason per layer left unscaled)``.
    """
    method = "awq+gptq" if gptq else "awq"
    hessians = task_hessians(model, names, task, method, "rtn")
    if not names:
        return hessians, {}, {}
    batch = tuple(task.calib[0])
    groups, order, reference = _input_groups(model, names, batch)  # folds are exact: reference stays valid
    alphas: dict[str, float] = {}
    reasons: dict[str, str] = {}
    for members in groups:
        producer = _verified_producer(model, members, order, batch, reference)
        if producer is None:
            why = "no LayerNorm or Linear producer whose output only these layers read (e.g. residual or GELU between)"
            reasons.update({m: why for m in members})
            continue
        layers = [model.get_submodule(m) for m in members]
        h = hessians[members[0]]  # (K, K), shared: the members read one input
        alpha, s = _search(layers, h, group_size)
        _fold(model.get_submodule(producer), layers, s)
        for m in members:
            hessians[m] = h / (s[:, None] * s[None, :])  # the input is now x / s
            alphas[m] = alpha
    for name, why in reasons.items():
        log.info("awq: %s rounded without scaling (%s)", name, why)
    return hessians, alphas, reasons


def clip_weights(model: nn.Module, hessians: dict[str, torch.Tensor], group_size: int) -> None:
    """AWQ's weight clipping of every Linear in ``hessians`` (in place; after ``scale_and_fold``, whose
    Hessians are those of the scaled inputs). Unlike the fold it changes the float function, a little."""
    for name, h in hessians.items():
        _clip(model.get_submodule(name), h, group_size)


@torch.no_grad()
def _clip(layer: nn.Linear, h: torch.Tensor, group_size: int) -> None:
    """Clamp each (row, group) of the weights to the clipping ratio with the least rounding output error."""
    w = layer.weight.detach().float().cpu()  # (N, K)
    n, k = w.shape
    g = group_size
    hg = torch.stack([h[i:i + g, i:i + g] for i in range(0, k, g)]).float().cpu()  # (G, g, g) diagonal blocks
    top = w.reshape(n, k // g, g).abs().amax(-1, keepdim=True)  # (N, G, 1)
    best_err = torch.full((n, k // g), float("inf"))
    best = torch.ones(n, k // g, 1)
    for r in CLIP_RATIOS:
        wc = torch.maximum(torch.minimum(w.reshape(n, k // g, g), r * top), -r * top).reshape(n, k)  # (N, K)
        e = (w - pack.dequantize_int4(*pack.quantize_weight_int4(wc, g))).reshape(n, k // g, g)  # (N, G, g)
        err = ((e.transpose(0, 1) @ hg).transpose(0, 1) * e).sum(-1)  # (N, G): e_g H_gg e_g^T
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = r
    lim = best * top  # (N, G, 1)
    clipped = torch.maximum(torch.minimum(w.reshape(n, k // g, g), lim), -lim).reshape(n, k)
    layer.weight.copy_(clipped.to(layer.weight))


def _input_groups(model: nn.Module, names: list[str], batch: tuple[Any, ...]
                  ) -> tuple[list[list[str]], list[str], torch.Tensor]:
    """Target Linears grouped by the input tensor they read, in execution order, the execution
    order of every LayerNorm / Linear (the candidate producers) and the model's output."""
    wanted = set(names)
    seen: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.LayerNorm)):
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                if name not in order:
                    order.append(name)
                if name in wanted and name not in seen:
                    seen[name] = args[0]
            handles.append(module.register_forward_pre_hook(hook))
    try:
        reference = _first(_run(model, batch))
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    for name in [n for n in order if n in seen]:
        x = seen[name]
        home = next((g for g in groups if seen[g[0]].shape == x.shape and torch.equal(seen[g[0]], x)), None)
        home.append(name) if home is not None else groups.append([name])
    return groups, order, reference


def _verified_producer(model: nn.Module, members: list[str], order: list[str], batch: tuple[Any, ...],
                       reference: torch.Tensor) -> str | None:
    """The nearest earlier LayerNorm / Linear whose fold with random scales leaves the output unchanged."""
    k = model.get_submodule(members[0]).in_features
    first = order.index(members[0])
    candidates = [n for n in reversed(order[:first]) if n not in members and _width(model.get_submodule(n)) == k]
    if not candidates:
        return None
    scale = max(1.0, float(reference.abs().max()))
    s = torch.exp(torch.empty(k).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(0)))  # (K,)
    layers = [model.get_submodule(m) for m in members]
    for name in candidates[:CANDIDATES]:
        producer = model.get_submodule(name)
        saved = [p.detach().clone() for p in (*producer.parameters(), *(layer.weight for layer in layers))]
        _fold(producer, layers, s)
        ok = bool((_first(_run(model, batch)) - reference).abs().max() <= TOLERANCE * scale)
        with torch.no_grad():
            for p, old in zip((*producer.parameters(), *(layer.weight for layer in layers)), saved):
                p.copy_(old)
        if ok:
            return name
    return None


def _width(module: nn.Module) -> int | None:
    """The number of channels a module's fold can rescale, or None when it has no per-channel params."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm) and module.weight is not None and len(module.normalized_shape) == 1:
        return module.normalized_shape[0]
    return None


def _fold(producer: nn.Module, layers: list[nn.Linear], s: torch.Tensor) -> None:
    """Producer's output channels divided by ``s`` (K,), the consumers' input columns multiplied by it."""
    with torch.no_grad():
        inv = 1.0 / s.to(producer.weight)  # in the weights' dtype, so s * (1 / s) rounds to 1 there
        if isinstance(producer, nn.Linear):
            producer.weight.mul_(inv[:, None])  # (K, in)
        else:
            producer.weight.mul_(inv)  # (K,)
        if producer.bias is not None:
            producer.bias.mul_(inv)
        for layer in layers:
            layer.weight.mul_(s.to(layer.weight)[None, :])  # (N, K)


def _search(layers: list[nn.Linear], h: torch.Tensor, group_size: int) -> tuple[float, torch.Tensor]:
    """The alpha (and its normalised (K,) scales) with the least summed output error over ``layers``
    when rounded to nearest. Also for ``awq+gptq``: searching with GPTQ in the loop costs 11 GPTQ
    runs per layer and chose the same scales on the tests' models (SQNR within 0.1 dB)."""
    a = torch.diag(h).clamp(min=0).sqrt().clamp(min=1e-8).cpu()  # (K,) RMS activation per input channel
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in ALPHAS:
        s = a ** alpha
        s = s / (s.max() * s.min()).sqrt()  # centred on 1 (geometric mean of the extremes)
        hs = h.cpu() / (s[:, None] * s[None, :])  # (K, K) Hessian of the scaled input x / s
        err = 0.0
        for layer in layers:
            w = layer.weight.detach().float().cpu() * s[None, :]  # (N, K)
            e = w - pack.dequantize_int4(*pack.quantize_weight_int4(w, group_size))  # (N, K), in the scaled space: E_s H_s E_s^T = E H E^T
            err += float(((e @ hs) * e).sum())
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[1], best[2]


def _run(model: nn.Module, batch: tuple[Any, ...]) -> Any:
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            return model(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in batch))
    finally:
        model.train(was_training)


def _first(output: Any) -> torch.Tensor:
    """The main output tensor (HF models return ModelOutput objects or tuples)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return _first(next(iter(output.values())))
    return _first(output[0])


__all__ = ["awq_offered", "clip_weights", "scale_and_fold"]
