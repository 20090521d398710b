"""Find the stack of transformer blocks in any encoder, and cut it to a subset of its blocks.

HF families name the stack differently (``encoder.layer`` in BERT, ``layers`` in newer ViTs,
``transformer.layer`` in DistilBERT); what they share is a ModuleList whose every item holds one
attention block. Students (fewer layers) and NAS members are cut from it the same way.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import build_registered, builder, builder_of
from slimkit.graph.attention import attention_blocks


def block_list(model: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` of the transformer blocks: the longest ModuleList whose every item
    holds exactly one attention block (``encoder.layer`` in BERT, ``layers`` in newer ViTs, ...)."""
    best: tuple[nn.Module, str, int] | None = None
    for module in model.modules():
        for attr, child in module.named_children():
            if (isinstance(child, nn.ModuleList) and len(child) > (best[2] if best else 0)
                    and all(len(attention_blocks(b)) == 1 for b in child)):
                best = (module, attr, len(child))
    if best is None:
        raise SlimkitError(f"{type(model).__name__} has no list of transformer encoder blocks",
                           "this needs a transformer encoder: a ModuleList of blocks with one attention each")
    return best[0], best[1]


#: Blocks a container must repeat to count as repeated blocks.
MIN_REPEATS = 2


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks, outermost first (never one inside another): the children
    of a ModuleList / Sequential holding at least two modules of one type that have submodules of
    their own (HF ``BertLayer``, torchvision ``BasicBlock``, ``nn.TransformerEncoderLayer``).
    Activation recomputation wraps them; block-by-block calibration walks them."""
    found: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        if any(name == f or name.startswith(f + ".") for f in found):
            continue
        children = list(module.named_children())
        kinds = {type(c) for _, c in children}
        if len(children) >= MIN_REPEATS and len(kinds) == 1 and all(any(True for _ in c.children())
                                                                     for _, c in children):
            found.extend(f"{name}.{n}" if name else n for n, _ in children)
    return found


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    parent, attr = block_list(model)
    return list(getattr(parent, attr))


def keep_blocks(model: nn.Module, indices: list[int]) -> nn.Module:
    """``model`` (in place) with only the blocks at ``indices``; block numbers and configs synced."""
    parent, attr = block_list(model)
    blocks = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in indices]))
    for new_idx, block in enumerate(getattr(parent, attr)):
        for m in block.modules():  # newer transformers number attention layers for their KV cache
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_idx
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(indices)
    return model


def name_subnet(student: nn.Module, base_of: nn.Module, layers: int) -> None:
    """Let ``student`` (``base_of`` cut to ``layers`` blocks) reload as such when ``base_of`` has a builder."""
    base = builder_of(base_of)
    if base is not None:
        student.slimkit_builder = ("encoder_subnet", {"base": base[0], "base_kwargs": base[1], "layers": layers})


@builder("encoder_subnet")
def build_encoder_subnet(base: str, base_kwargs: dict[str, Any], layers: int) -> nn.Module:
    """The base architecture cut to ``layers`` blocks; loading resizes its layers to the saved tensors."""
    model = keep_blocks(build_registered(base, base_kwargs, what="encoder subnet"), list(range(layers)))
    model.slimkit_builder = ("encoder_subnet", {"base": base, "base_kwargs": base_kwargs, "layers": layers})
    return model

