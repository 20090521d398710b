"""Masks shared by the unstructured and N:M pruners: which layers, applying, keeping them applied.

A mask is a bool tensor shaped like a layer's weight, True where the weight is kept, keyed by the
module name. Masks are made permanent as zeros in the weights (no parametrization is left
behind), so a pruned model is a plain model; :func:`masked` keeps those zeros in place while
the model is fine-tuned.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.nn.modules.conv import _ConvNd

from slimkit.core.editing import select
from slimkit.core.errors import SlimkitError

log = logging.getLogger("slimkit.prune")

Masks = dict[str, torch.Tensor]
#: ``after_step(model, step)``: what a fine-tuning loop calls after each optimizer step.
AfterStep = Callable[[nn.Module, int], Any]
PRUNABLE = (nn.Linear, _ConvNd)


def prunable(model: nn.Module, targets: str | tuple[str, ...] = "all", exclude: str | tuple[str, ...] = (),
             ) -> tuple[list[str], dict[str, str]]:
    """Selected Linear/Conv layer names, and the selected layers we cannot prune, with why (logged)."""
    names = select(model, targets, exclude, kinds=(nn.Module,))
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name in names:
        m = model.get_submodule(name)
        w = getattr(m, "weight", None)
        if isinstance(m, PRUNABLE) and isinstance(w, torch.Tensor) and w.is_floating_point():
            chosen.append(name)
        elif not list(m.children()):  # a leaf we were asked to prune but cannot: say so, don't crash
            skipped[name] = f"{type(m).__name__} has no float Linear/Conv weight to prune"
    for name, why in skipped.items():
        log.info("not pruned: %s (%s)", name, why)
    if not chosen:
        raise SlimkitError("no layer to prune: targets matched no Linear/Conv layer",
                           "check targets/exclude ('all', 'all-linear', a regex or module names)")
    return chosen, skipped


def weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Write zeros where the masks are False (``+0.0``, so the sparse storage sees exact zeros)."""
    with torch.no_grad():
        for name, mask in masks.items():
            w = weight(model, name)
            if mask.shape != w.shape:
                raise SlimkitError(f"mask for {name} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}",
                                   "compute the masks on this model")
            w.masked_fill_(~mask.to(w.device), 0.0)


def masks_from_zeros(model: nn.Module, names: list[str] | None = None) -> Masks:
    """Masks of the zeros already in the weights: how a saved/pruned model says what was pruned."""
    names = prunable(model)[0] if names is None else names
    return {n: weight(model, n).detach() != 0 for n in names}


class Remask:
    """``after_step`` callback re-applying masks, so optimizer momentum cannot revive pruned weights."""

    def __init__(self, masks: Masks) -> None:
        self.masks = masks

    def __call__(self, model: nn.Module, step: int = 0) -> None:
        apply_masks(model, self.masks)


@contextlib.contextmanager
def masked(model: nn.Module, masks: Masks | None = None) -> Iterator[Remask]:
    """Keep ``masks`` enforced while fine-tuning inside the block.

    Gradients of pruned weights are zeroed by hooks (enough for a fresh SGD/Adam/AdamW: their
    updates of a zero weight with zero gradient are zero), and the yielded callback re-masks
    after each step for loops that take an ``after_step`` (needed when the optimizer carries
    state from before pruning). Masks are re-applied on exit either way::

        with masked(model) as after_step:
            finetune(model, task, steps=300, after_step=after_step)
    """
    masks = masks_from_zeros(model) if masks is None else masks
    apply_masks(model, masks)
    hooks = []
    for name, mask in masks.items():
        w = weight(model, name)
        keep = mask.to(w.device)
        hooks.append(w.register_hook(lambda g, keep=keep: g.masked_fill(~keep, 0.0)))
    try:
        yield Remask(masks)
    finally:
        for h in hooks:
            h.remove()
        apply_masks(model, masks)


def layer_sparsity(model: nn.Module, names: list[str] | None = None) -> dict[str, float]:
    """Fraction of exact zeros in each prunable layer's weight, in model order.

    Reads ``module.weight``, so masks applied through ``torch.nn.utils.prune`` or a
    parametrization count as zeros too.
    """
    names = prunable(model)[0] if names is None else names
    return {n: float((weight(model, n) == 0).sum()) / max(weight(model, n).numel(), 1) for n in names}


def global_sparsity(model: nn.Module, names: list[str] | None = None) -> float:
    """Fraction of exact zeros over all the named (default: every prunable) layers' weights."""
    names = prunable(model)[0] if names is None else names
    zeros = sum(int((weight(model, n) == 0).sum()) for n in names)
    return zeros / max(sum(weight(model, n).numel() for n in names), 1)
