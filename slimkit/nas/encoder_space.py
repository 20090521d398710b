"""Encoder NAS as a pipeline stage: the optimizer's trial picks layers, heads and FFN width.

The config ``nas.Encoder`` names one member of the model's own encoder space; its handler slices
it out of the model (heads and units ranked on the task's calibration text). Recovery is the next
stage's job (distillation from the original), as for pruning.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch.nn as nn

from slimkit.config import BaseConfig, register, register_handler
from slimkit.errors import SlimkitError
from slimkit.nas.encoder import EncoderArch, EncoderSpace, rank, subnet
from slimkit.search.space import SearchContext, register_technique


@register("nas.Encoder")
@dataclasses.dataclass(frozen=True)
class Encoder(BaseConfig):
    """Keep ``layers`` blocks with ``heads`` heads and ``ffn`` FFN units each; rank on ``rank_batches``."""

    version: ClassVar[int] = 1
    layers: int = 3
    heads: int = 12
    ffn: int = 1536
    rank_batches: int = 4

    def __post_init__(self) -> None:
        if min(self.layers, self.heads, self.ffn) < 1 or self.rank_batches < 0:
            raise SlimkitError(f"nas.Encoder layers={self.layers}, heads={self.heads}, ffn={self.ffn}, "
                               f"rank_batches={self.rank_batches}", "layers, heads, ffn >= 1; rank_batches >= 0")


def slice_encoder(model: nn.Module, config: Encoder, task: Any) -> nn.Module:
    """Handler of :class:`Encoder`: the member, ranked on the task's calibration inputs when it has them."""
    inputs = list(getattr(task, "calib", ()) or ())[:config.rank_batches]
    return subnet(model, EncoderArch(config.layers, config.heads, config.ffn), rank(model, inputs))


register_handler(Encoder, slice_encoder)


def suggest(trial: Any, ctx: SearchContext) -> Encoder:
    arch = EncoderSpace.from_model(ctx.task.model).suggest(trial, prefix="nas_encoder")
    return Encoder(layers=arch.layers, heads=arch.heads, ffn=arch.ffn)


def applies(ctx: SearchContext) -> bool:
    """A BERT-style encoder (blocks with q/k/v, output projection, FFN pair)."""
    try:
        EncoderSpace.from_model(ctx.task.model)
    except SlimkitError:
        return False
    return True


register_technique("nas_encoder", "nas", suggest, applies)
