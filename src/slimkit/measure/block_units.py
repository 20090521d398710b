"""Which row of a transformer's breakdown each module's own work belongs to.

Leaf modules of an HF encoder are the Linears, norms and dropouts; the attention itself (scores,
softmax, the weighted sum), the masks and the residual adds are code in the parents' ``forward``.
Timed at the leaves, most of a transformer's time lands in ``(other)``. Timed at the level a reader
acts on — per block: attention, MLP, norms; the embeddings; the head — nearly all of it is named.

Each module's *own* work (its time minus its children's) goes to one unit:

- inside a block: the first of norm / attention met walking up from the module to the block,
  else the block's MLP (the block's own code, residual adds, is the block's ``rest``);
- under a module whose class is an embeddings class: that module;
- any other module outside the blocks: its outermost ancestor that holds no block;
- the model and the containers of the blocks: ``(other)``.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.graph.attention import attention_blocks
from slimkit.graph.blocks import block_list

#: Name of the row for the work no unit owns (shared with the leaf-level breakdown).
OTHER = "(other)"
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One row: its name (``encoder.layer.0 attention``) and the module types whose work it holds."""

    name: str
    kind: str


def transformer_units(model: nn.Module) -> dict[str, Unit] | None:
    """Module name -> its unit, for every module of ``model``; None when it has no stack of attention blocks."""
    try:
        parent, attr = block_list(model)
    except SlimkitError:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    stack = _join(names[id(parent)], attr)
    blocks = {_join(stack, str(i)): b for i, b in enumerate(getattr(parent, attr))}
    attention = {id(a.module) for b in blocks.values() for a in attention_blocks(b)}
    holders = {_prefix(b, k) for b in blocks for k in range(b.count(".") + 2)} | {""}  # ancestors of blocks
    modules = dict(model.named_modules())

    units: dict[str, Unit] = {}
    kinds: dict[str, list[str]] = {}  # unit name -> types of the modules that decide it, in order
    for name, module in modules.items():
        if name in holders and name not in blocks:
            unit, top = OTHER, None
        elif (block := _enclosing(name, blocks)) is not None:
            unit, top = _in_block(name, block, modules, attention)
        else:
            unit, top = _outside(name, modules, holders)
        if top is not None and type(modules[top]).__name__ not in kinds.setdefault(unit, []):
            kinds[unit].append(type(modules[top]).__name__)
        units[name] = Unit(unit, "")
    return {n: Unit(u.name, "+".join(kinds.get(u.name, [])) or "-") for n, u in units.items()}


def _in_block(name: str, block: str, modules: dict[str, nn.Module], attention: set[int]) -> tuple[str, str]:
    """``(unit, deciding module)`` for a module inside ``block``: norm, attention, MLP, or the block's rest."""
    if name == block:
        return f"{block} rest", block
    path = name
    while path != block:  # from the module up to (not including) the block
        module = modules[path]
        if _is_norm(module):
            return f"{block} norm", path
        if id(module) in attention or _is_attention(module):
            top = path  # the outermost attention module names the row
            while (up := path.rsplit(".", 1)[0]) != block and _is_attention(modules[up]):
                path = top = up
            return f"{block} attention", top
        path = path.rsplit(".", 1)[0]
    child = name[len(block) + 1:].split(".", 1)[0]
    return f"{block} MLP", _join(block, child)


def _outside(name: str, modules: dict[str, nn.Module], holders: set[str]) -> tuple[str, str]:
    """The embeddings module above ``name``, else its outermost ancestor that holds no block."""
    parts = name.split(".")
    for k in range(1, len(parts) + 1):
        path = ".".join(parts[:k])
        if "embedding" in type(modules[path]).__name__.lower() and not isinstance(modules[path], nn.Embedding):
            return path, path
    top = next(".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) not in holders)
    return top, top


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.lower().endswith("norm")


def _is_attention(module: nn.Module) -> bool:
    kind = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or "attention" in kind or "attn" in kind


def _enclosing(name: str, blocks: dict[str, nn.Module]) -> str | None:
    for block in blocks:
        if name == block or name.startswith(block + "."):
            return block
    return None


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _prefix(name: str, k: int) -> str:
    return ".".join(name.split(".")[:k]) if k else ""
