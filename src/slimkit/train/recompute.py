"""Activation recomputation: trade a second forward pass of each repeated block for its activations.

Training keeps every intermediate tensor of the forward pass for the backward pass; in a
transformer or a ResNet almost all of them live inside the repeated blocks. ``recomputing(model)``
wraps the forward of each such block in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``:
the forward keeps only the block's inputs, the backward runs the block again to get the rest.
Gradients are the same (the RNG state is replayed, so dropout draws the same masks; BatchNorm
running statistics are not updated a second time); the cost is one more forward of the blocks per step.

Repeated blocks: the children of an ``nn.ModuleList`` / ``nn.Sequential`` holding at least two
modules of one type that have submodules of their own (HF ``BertLayer``, torchvision
``BasicBlock`` / ``Bottleneck``, ``nn.TransformerEncoderLayer``); a block inside a block found
already is not wrapped again. The model is unchanged after the ``with`` block (the wrap is an
instance attribute, removed on exit), so saved artifacts never contain it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from slimkit.graph.blocks import repeated_blocks

@contextlib.contextmanager
def _norm_stats_kept(block: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics left as they are: the recomputation must not count a batch twice."""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _checkpointed(block: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The block's forward, recomputed in the backward while training with gradients on."""
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _norm_stats_kept(block)), **kwargs)
    return forward(*args, **kwargs)


@contextlib.contextmanager
def recomputing(model: nn.Module, enabled: bool = True) -> Iterator[list[str]]:
    """Inside the block the model's repeated blocks recompute their activations; yields their names."""
    if not enabled:
        yield []
        return
    names = repeated_blocks(model)
    blocks = [model.get_submodule(n) for n in names]
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block, block.forward)  # type: ignore[method-assign]
    try:
        yield names
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward


def activation_bytes(model: nn.Module, step: Callable[[], torch.Tensor], recompute: bool) -> dict[str, int]:
    """What one training step keeps for its backward pass, in bytes: run ``step()`` (a forward that
    returns the loss), then its backward.

    ``saved``: distinct tensors autograd holds when the forward ends (the activation peak), parameters
    and buffers left out; with ``recompute`` it counts the blocks' inputs, which the checkpoints keep.
    ``largest_block``: the most any one block saved (without ``recompute``): the memory its
    recomputation needs again during the backward, on top of ``saved``.
    """
    names = repeated_blocks(model)
    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    per_block = dict.fromkeys(names, 0)
    state: dict[str, Any] = {"block": None, "forward": True}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in fixed and key not in seen:
            seen[key] = storage.nbytes()
            if state["block"] is not None:
                per_block[state["block"]] += storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def enter(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not state["forward"]:
                return  # the backward's recomputation
            if recompute:  # the checkpoint holds its inputs until the backward
                for a in args:
                    if isinstance(a, torch.Tensor):
                        keep(a)
            state["block"] = name
        return hook

    def leave(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        state["block"] = None

    handles = []
    for name in names:
        block = model.get_submodule(name)
        handles += [block.register_forward_pre_hook(enter(name)), block.register_forward_hook(leave)]
    try:
        with recomputing(model, recompute), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
        state["forward"] = False
        saved = sum(seen.values())
        loss.backward()  # the checkpoints recompute through the forward they captured
    finally:
        for h in handles:
            h.remove()
    return {"saved": saved, "largest_block": max(per_block.values(), default=0)}
