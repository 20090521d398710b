"""Calibrate a model one repeated block at a time, holding one block's statistics.

GPTQ, SparseGPT and static int8 need statistics of every target layer's inputs. Hooking every layer
at once holds all of them together (a 1B decoder's float64 input Hessians outgrow its weights). Here
the inputs of the first block are captured, then for each block in turn: its layers' statistics are
gathered while it runs on its captured inputs, ``apply`` compresses those layers, and the block's
outputs become the next block's inputs, the previous ones freed. ``propagate="quantized"`` (GPTQ's
sequential convention) runs the block again after ``apply``, so later blocks calibrate on the errors
they will really see; ``"float"`` passes on the outputs of the statistics run (before ``apply``),
which gives exactly the statistics a whole-model pass over the float model gives.

Layers outside the blocks (embeddings side, heads) are calibrated in one whole-model pass first, on
the float model as before; a model with no repeated blocks (``graph.blocks.repeated_blocks``) is all
outside, i.e. the whole-model path.

Chaining: the next block's first input (``args[0]``, or ``hidden_states=``) is this block's output
(its first element when a tuple); other arguments (masks, position embeddings) are the first block's.
The capture pass checks that on the first batch (block 1's real input must equal block 0's output);
where it does not hold, or a block sits in another container (a ResNet stage), its inputs are captured
by running the model up to it instead. KV caches passed to blocks are dropped (``use_cache=False``):
running a block twice must not grow them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ContextManager, Iterable

import torch
import torch.nn as nn

from slimkit.calibrate.obs import check_reached
from slimkit.core.errors import SlimkitError
from slimkit.core.progress import each
from slimkit.graph.blocks import repeated_blocks

#: ``gather(modules) -> context``: hooks those modules while forwards run; the yielded dict holds one
#: statistic per module on exit (``obs.hessian_hooks``, ``ranges.observer_hooks``).
Gather = Callable[[dict[str, nn.Module]], ContextManager[dict[str, Any]]]
#: ``apply(stats)``: compress the layers named in ``stats`` in place in the model (weights or submodules).
Apply = Callable[[dict[str, Any]], None]
Call = tuple[tuple[Any, ...], dict[str, Any]]  # a block's positional and keyword inputs
PROPAGATE = ("quantized", "float")
_CACHES = ("past_key_value", "past_key_values", "layer_past")


class _Stop(Exception):
    """Raised from a hook to end a forward once the inputs it needs are captured."""


@dataclasses.dataclass
class Walk:
    """What a calibration did: the blocks walked in order, the layers calibrated in the whole-model
    pass, the most layer statistics alive at once, and how many blocks needed their own capture pass."""

    blocks: list[str]
    outside: list[str]
    max_held: int = 0
    captures: int = 0


def calibrate_blockwise(model: nn.Module, names: list[str], batches: Iterable[Any], gather: Gather, apply: Apply,
                        *, propagate: str = "quantized", blocks: list[str] | None = None,
                        label: str = "calibrating") -> Walk:
    """Gather statistics for the layers ``names`` and ``apply`` them, block by block (see the module doc).

    ``blocks``: the block names to walk (default: the model's repeated blocks; ``[]``: the whole-model
    pass for every layer, as before). Returns the ``Walk``.
    """
    if propagate not in PROPAGATE:
        raise SlimkitError(f"propagate={propagate!r} is not known", f"use one of {', '.join(PROPAGATE)}")
    modules = dict(model.named_modules())
    blocks = repeated_blocks(model) if blocks is None else list(blocks)
    inside = {b: [n for n in names if n.startswith(b + ".")] for b in blocks}
    if not any(inside.values()):
        blocks = []
    walked = {n for b in blocks for n in inside[b]}
    outside = [n for n in names if n not in walked]
    walk = Walk(blocks, outside)
    device = next(iter(model.parameters()), torch.empty(0)).device
    data = [tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in
                  ((b,) if isinstance(b, torch.Tensor) else tuple(b))) for b in batches]
    if not data:
        raise SlimkitError("calibration set is empty", "give the task calibration batches")
    was_training = model.training
    model.eval()
    try:
        chained = False
        calls: list[Call] = []
        if outside or blocks:  # the whole-model pass: outside layers' statistics, the first block's inputs
            follow = blocks[1] if len(blocks) > 1 and _parent(blocks[1]) == _parent(blocks[0]) else None
            with gather({n: modules[n] for n in outside}) as stats:
                if blocks:
                    calls, chained = _capture(model, data, modules, blocks[0], follow, full=bool(outside))
                else:
                    _forwards(model, data)
            check_reached(outside, stats)
            walk.max_held = len(stats)
            if stats:
                apply(stats)
            del stats
        for i, name in enumerate(each(blocks, f"{label} block by block")):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            if i and not calls:  # not chained to the block before: run the model up to this one
                follow = nxt if nxt and _parent(nxt) == _parent(name) else None
                calls, chained = _capture(model, data, modules, name, follow, full=False)
                walk.captures += 1
            block = modules[name]
            passes_on = nxt is not None and chained and _parent(nxt) == _parent(name)
            with gather({n: modules[n] for n in inside[name]}) as stats:
                _run_block(block, calls, chain=passes_on and propagate == "float")
            check_reached(inside[name], stats)
            walk.max_held = max(walk.max_held, len(stats))
            if stats:
                apply(stats)
            del stats
            if passes_on and propagate == "quantized":
                _run_block(block, calls, chain=True)
            if not passes_on:
                calls = []
    finally:
        model.train(was_training)
    return walk


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _hidden(call: Call) -> Any:
    args, kwargs = call
    return args[0] if args else kwargs.get("hidden_states")


def _first(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output
    return output[0]  # a tuple / list / HF ModelOutput: the hidden states come first


def _forwards(model: nn.Module, data: list[tuple[Any, ...]]) -> None:
    with torch.inference_mode():
        for batch in data:
            try:
                model(*batch)
            except _Stop:
                pass


def _capture(model: nn.Module, data: list[tuple[Any, ...]], modules: dict[str, nn.Module], name: str,
             follow: str | None, *, full: bool) -> tuple[list[Call], bool]:
    """The inputs ``name`` gets on each batch, and whether ``follow`` (the next block) gets its output
    (checked on the first batch). Forwards stop at the block unless ``full`` (other hooks need them)."""
    calls: list[Call] = []
    first_output: list[Any] = []
    chained = [False]

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = {k: (None if k in _CACHES else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls.append((args, kwargs))
        if not full and (follow is None or len(calls) > 1):
            raise _Stop

    def keep_output(module: nn.Module, args: tuple, output: Any) -> None:
        if len(calls) == 1 and not first_output:
            first_output.append(_first(output))

    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(calls) == 1 and first_output:
            got, want = _hidden((args, kwargs)), first_output.pop()
            chained[0] = isinstance(got, torch.Tensor) and got.shape == want.shape and torch.equal(got, want)
        if not full:
            raise _Stop

    handles = [modules[name].register_forward_pre_hook(record, with_kwargs=True)]
    if follow is not None:
        handles.append(modules[name].register_forward_hook(keep_output))
        handles.append(modules[follow].register_forward_pre_hook(check, with_kwargs=True))
    try:
        _forwards(model, data)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(data):
        raise SlimkitError(f"calibration reached block {name!r} on {len(calls)} of {len(data)} batches",
                           "give calibration batches that run through every block once")
    return calls, chained[0]


def _run_block(block: nn.Module, calls: list[Call], *, chain: bool) -> None:
    """Run ``block`` on each captured input; with ``chain``, each input is replaced by the next block's
    (this block's output in the hidden-states slot), so only one set of activations is alive."""
    with torch.inference_mode():
        for j, call in enumerate(calls):
            out = _first(block(*call[0], **call[1]))
            if chain:
                args, kwargs = call
                calls[j] = ((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out})
            del out


__all__ = ["Apply", "Gather", "PROPAGATE", "Walk", "calibrate_blockwise"]
