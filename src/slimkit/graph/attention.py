"""Find multi-head attention blocks so that whole heads are pruned, never slices of a head.

Every encoder family in HF transformers (BERT, DistilBERT, ViT, Swin, ...) computes
``q_proj(x).view(..., -1, head_dim)``: the number of heads follows from the projection width,
while ``head_dim`` is fixed. Removing a whole head therefore keeps the forward pass correct;
removing a few dims inside every head would silently regroup the features into wrong heads.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

#: (query, key, value) child names used by the encoder families we support.
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))
_HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
_HEAD_DIM_ATTRS = ("attention_head_size", "head_dim")
_WIDTH_ATTRS = ("all_head_size",)


@dataclasses.dataclass
class AttentionBlock:
    """One attention module: its q/k/v projections, head count and head width."""

    name: str
    module: nn.Module
    qkv: tuple[nn.Linear, nn.Linear, nn.Linear]
    heads: int
    head_dim: int
    #: Why whole-head pruning is not allowed here (``None`` when it is).
    frozen_reason: str | None = None


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """Every module that owns q/k/v Linear children and a head-count attribute."""
    blocks = []
    for name, module in model.named_modules():
        qkv = _qkv(module)
        heads = _first_attr(module, _HEAD_COUNT_ATTRS)
        if qkv is None or not isinstance(heads, int) or heads <= 0:
            continue
        head_dim = _first_attr(module, _HEAD_DIM_ATTRS)
        if not isinstance(head_dim, int):
            head_dim = qkv[0].out_features // heads
        block = AttentionBlock(name=name, module=module, qkv=qkv, heads=heads, head_dim=head_dim)
        block.frozen_reason = _per_head_state(module, qkv, heads)
        if qkv[0].out_features != heads * head_dim or len({m.out_features for m in qkv}) != 1:
            block.frozen_reason = "q/k/v widths do not equal heads x head_dim"
        blocks.append(block)
    return blocks


def sync_head_counts(blocks: list[AttentionBlock]) -> dict[str, tuple[int, int]]:
    """After pruning, write the new head counts back into the modules; returns name -> (before, after)."""
    changed = {}
    for block in blocks:
        after = block.qkv[0].out_features // block.head_dim
        for attr in _HEAD_COUNT_ATTRS:
            if isinstance(getattr(block.module, attr, None), int):
                setattr(block.module, attr, after)
        for attr in _WIDTH_ATTRS:
            if isinstance(getattr(block.module, attr, None), int):
                setattr(block.module, attr, after * block.head_dim)
        if after != block.heads:
            changed[block.name] = (block.heads, after)
    return changed


def _qkv(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    for names in _QKV_NAMES:
        layers = [getattr(module, n, None) for n in names]
        if all(isinstance(m, nn.Linear) for m in layers):
            return tuple(layers)  # type: ignore[return-value]
    return None


def _first_attr(module: nn.Module, names: tuple[str, ...]) -> object:
    for n in names:
        if hasattr(module, n):
            return getattr(module, n)
    return None


def _per_head_state(module: nn.Module, qkv: tuple[nn.Linear, ...], heads: int) -> str | None:
    """A parameter or buffer with one slot per head (e.g. Swin's relative-position bias table) would
    need its head axis pruned too; such blocks keep all their heads."""
    skip = {id(p) for layer in qkv for p in layer.parameters()}
    for pname, tensor in module.named_parameters():
        if id(tensor) in skip:
            continue
        if tensor.dim() >= 2 and heads in tensor.shape and heads > 1 and not _is_linear_param(module, pname):
            return f"per-head parameter {pname} {tuple(tensor.shape)}"
    return None


def _is_linear_param(module: nn.Module, pname: str) -> bool:
    owner = module.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else module
    return isinstance(owner, nn.Linear)
