"""NAS for transformer encoders: layers, heads and FFN width, as slices of the user's own model.

The search space is built from the model (BERT-style blocks: q/k/v, an attention output
projection, an FFN up and down projection). A member keeps ``layers`` blocks (evenly spaced,
ending at the last, like DistilBERT's students), ``heads`` heads and ``ffn`` intermediate units
per block. Heads and units are ranked once by how much they contribute to the block's output on
real inputs, and every member keeps a prefix of that ranking: the members are nested slices of
the pre-trained model, a weight-sharing supernet that needs no training (once-for-all style).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import random
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn as nn

from slimkit.core.config import BaseConfig, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.record import StepRecord, add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.distill.student import kept_layers
from slimkit.graph.attention import AttentionBlock, attention_blocks, sync_head_counts
from slimkit.graph.blocks import encoder_blocks, keep_blocks, name_subnet

ROUND_TO = 8  # FFN widths the CPU GEMM kernels like


@dataclasses.dataclass(frozen=True)
class EncoderArch:
    """One member: ``layers`` blocks, each with ``heads`` attention heads and ``ffn`` FFN units."""

    layers: int
    heads: int
    ffn: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BlockParts:
    """The four projections of one transformer block that the search shrinks."""

    attention: AttentionBlock
    out: nn.Linear   # (hidden, heads*head_dim): attention output projection
    up: nn.Linear    # (ffn, hidden)
    down: nn.Linear  # (hidden, ffn)


def block_parts(block: nn.Module) -> BlockParts:
    """Find q/k/v, the attention output and the FFN pair in one block (BERT, DistilBERT and alike)."""
    found = attention_blocks(block)
    if len(found) != 1 or found[0].frozen_reason:
        why = found[0].frozen_reason if len(found) == 1 else f"{len(found)} attention modules"
        raise SlimkitError(f"{type(block).__name__} is not a plain encoder block ({why})",
                           "encoder NAS supports BERT-style blocks: q/k/v, output projection, FFN up/down")
    attn = found[0]
    qkv = {id(m) for m in attn.qkv}
    rest = [m for m in block.modules() if isinstance(m, nn.Linear) and id(m) not in qkv]
    if len(rest) != 3:
        raise SlimkitError(f"{type(block).__name__} has {len(rest)} Linear layers besides q/k/v, expected 3",
                           "encoder NAS supports BERT-style blocks: output projection, FFN up, FFN down")
    out, up, down = rest
    width = attn.heads * attn.head_dim
    if out.in_features != width or up.out_features != down.in_features or down.out_features != up.in_features:
        raise SlimkitError(f"{type(block).__name__}: projection shapes do not chain as attention -> FFN",
                           "encoder NAS supports BERT-style blocks")
    return BlockParts(attn, out, up, down)


@dataclasses.dataclass(frozen=True)
class EncoderSpace:
    """Choices per dimension, plus what the parameter-count formula needs."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    ffns: tuple[int, ...]
    total_layers: int
    hidden: int
    head_dim: int
    fixed_params: int  # embeddings, pooler, ...: everything outside the blocks
    block_norm_params: int  # LayerNorms inside one block

    @classmethod
    def from_model(cls, model: nn.Module) -> "EncoderSpace":
        blocks = encoder_blocks(model)
        parts = block_parts(blocks[0])
        heads, ffn, total = parts.attention.heads, parts.up.out_features, len(blocks)
        in_blocks = sum(p.numel() for b in blocks for p in b.parameters())
        norms = sum(p.numel() for m in blocks[0].modules() if isinstance(m, nn.LayerNorm) for p in m.parameters())
        quarter = lambda n: tuple(sorted({max(1, round(n * q / 4)) for q in (1, 2, 3, 4)}))  # noqa: E731
        ffns = tuple(sorted({max(ROUND_TO, round(ffn * q / 4 / ROUND_TO) * ROUND_TO) for q in (1, 2, 3, 4)}))
        return cls(layers=tuple(sorted({max(1, round(total * q / 3)) for q in (1, 2, 3)} | {max(1, total // 2)})),
                   heads=quarter(heads), ffns=ffns, total_layers=total, hidden=parts.up.in_features,
                   head_dim=parts.attention.head_dim,
                   fixed_params=sum(p.numel() for p in model.parameters()) - in_blocks, block_norm_params=norms)

    def members(self) -> Iterable[EncoderArch]:
        return (EncoderArch(*c) for c in itertools.product(self.layers, self.heads, self.ffns))

    def contains(self, arch: EncoderArch) -> bool:
        return arch.layers in self.layers and arch.heads in self.heads and arch.ffn in self.ffns

    def smallest(self) -> EncoderArch:
        return EncoderArch(self.layers[0], self.heads[0], self.ffns[0])

    def largest(self) -> EncoderArch:
        return EncoderArch(self.layers[-1], self.heads[-1], self.ffns[-1])

    def suggest(self, trial: Any, prefix: str = "nas") -> EncoderArch:
        return EncoderArch(trial.suggest_categorical(f"{prefix}.layers", list(self.layers)),
                           trial.suggest_categorical(f"{prefix}.heads", list(self.heads)),
                           trial.suggest_categorical(f"{prefix}.ffn", list(self.ffns)))

    def sample(self, rng: random.Random) -> EncoderArch:
        return EncoderArch(rng.choice(self.layers), rng.choice(self.heads), rng.choice(self.ffns))

    def mutate(self, arch: EncoderArch, rng: random.Random) -> EncoderArch:
        """One dimension moved one step up or down (stays inside the space)."""
        field, choices = rng.choice([("layers", self.layers), ("heads", self.heads), ("ffn", self.ffns)])
        i = choices.index(getattr(arch, field)) + rng.choice((-1, 1))
        return dataclasses.replace(arch, **{field: choices[min(max(i, 0), len(choices) - 1)]})

    def param_count(self, arch: EncoderArch) -> int:
        """Parameters of the member: q/k/v and output projection, FFN pair, LayerNorms, per block."""
        width, h = arch.heads * self.head_dim, self.hidden
        attention = 3 * (h * width + width) + width * h + h
        ffn = h * arch.ffn + arch.ffn + arch.ffn * h + h
        return self.fixed_params + arch.layers * (attention + ffn + self.block_norm_params)


@dataclasses.dataclass
class Ranking:
    """Per original block index: heads and FFN units, most important first."""

    heads: list[list[int]]
    units: list[list[int]]


def rank(model: nn.Module, inputs: Sequence[tuple[torch.Tensor, ...]] = ()) -> Ranking:
    """Rank heads and FFN units by their mean contribution to the block output on ``inputs``.

    A head's contribution is the norm of its slice of the output projection applied to its context
    vectors; a unit's is ``|activation| * ||its column of the down projection||``. Without inputs
    the weights alone decide (sum of squares of a head's or unit's rows and columns).
    """
    parts = [block_parts(b) for b in encoder_blocks(model)]
    head_score = [torch.zeros(p.attention.heads) for p in parts]
    unit_score = [torch.zeros(p.up.out_features) for p in parts]
    if inputs:
        hooks = []
        for i, p in enumerate(parts):
            hooks.append(p.out.register_forward_pre_hook(_head_hook(p, head_score[i])))
            hooks.append(p.down.register_forward_pre_hook(_unit_hook(p, unit_score[i])))
        try:
            with torch.inference_mode():
                for batch in inputs:
                    model(*batch)
        finally:
            for h in hooks:
                h.remove()
    else:
        for i, p in enumerate(parts):
            d = p.attention.head_dim
            rows = sum(m.weight.detach().pow(2).sum(1) for m in p.attention.qkv)  # (heads*d,)
            cols = p.out.weight.detach().pow(2).sum(0)  # (heads*d,)
            head_score[i] = (rows + cols).view(-1, d).sum(1)
            unit_score[i] = p.up.weight.detach().pow(2).sum(1) + p.down.weight.detach().pow(2).sum(0)
    order = lambda s: torch.argsort(s, descending=True, stable=True).tolist()  # noqa: E731
    return Ranking([order(s) for s in head_score], [order(s) for s in unit_score])


def _head_hook(p: BlockParts, acc: torch.Tensor) -> Any:
    d, w = p.attention.head_dim, p.out.weight.detach()  # w: (hidden, heads*d)

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        ctx = args[0].detach().reshape(-1, acc.numel(), d)  # (tokens, heads, d)
        per_head = torch.einsum("thd,ohd->tho", ctx, w.view(w.shape[0], -1, d))  # (tokens, heads, hidden)
        acc.add_(per_head.norm(dim=-1).mean(0))
    return hook


def _unit_hook(p: BlockParts, acc: torch.Tensor) -> Any:
    col = p.down.weight.detach().norm(dim=0)  # (ffn,)

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        acc.add_(args[0].detach().reshape(-1, col.numel()).abs().mean(0) * col)
    return hook


def subnet(model: nn.Module, arch: EncoderArch, ranking: Ranking | None = None) -> nn.Module:
    """A copy of ``model`` shrunk to ``arch``; its weights are slices of ``model``'s."""
    space = EncoderSpace.from_model(model)
    parts0 = block_parts(encoder_blocks(model)[0])
    if not (1 <= arch.layers <= space.total_layers and 1 <= arch.heads <= parts0.attention.heads
            and 1 <= arch.ffn <= parts0.up.out_features):
        raise SlimkitError(f"architecture {arch.to_dict()} does not fit inside the model "
                           f"({space.total_layers} layers, {parts0.attention.heads} heads, {parts0.up.out_features} FFN)",
                           "choose members of EncoderSpace.from_model(model)")
    ranking = ranking or rank(model)
    keep = kept_layers(space.total_layers, arch.layers)
    student = keep_blocks(copy.deepcopy(model), keep)
    for block, original in zip(encoder_blocks(student), keep):
        p = block_parts(block)
        d = p.attention.head_dim
        heads = sorted(ranking.heads[original][:arch.heads])
        channels = torch.tensor([h * d + j for h in heads for j in range(d)])
        for lin in p.attention.qkv:
            _keep_rows(lin, channels)
        _keep_cols(p.out, channels)
        units = torch.tensor(sorted(ranking.units[original][:arch.ffn]))
        _keep_rows(p.up, units)
        _keep_cols(p.down, units)
        sync_head_counts([p.attention])
    _sync_config(student, arch)
    name_subnet(student, model, arch.layers)  # reloads as: base architecture, cut, resized to the saved tensors
    student.slimkit_resized = True
    add_record(student, ArchRecord("nas.Encoder", arch.to_dict(), arch=arch.to_dict(), kept_layers=keep))
    return student.eval()


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[idx].clone())
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach()[idx].clone())
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight.detach()[:, idx].clone())
    lin.in_features = len(idx)


def _sync_config(model: nn.Module, arch: EncoderArch) -> None:
    """Keep HF configs truthful (heads and FFN width are uniform across the member's blocks)."""
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is None:
            continue
        for attr, value in (("num_attention_heads", arch.heads), ("intermediate_size", arch.ffn)):
            if hasattr(config, attr):
                setattr(config, attr, value)




@dataclasses.dataclass
class ArchRecord(StepRecord):
    """The encoder member a model was cut to, and which of the original blocks it kept."""

    arch: dict[str, int] = dataclasses.field(default_factory=dict)
    kept_layers: list[int] = dataclasses.field(default_factory=list)


@technique("nas.Encoder", stage="nas", search="nas_encoder")
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

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return slice_encoder(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Encoder:
        arch = EncoderSpace.from_model(ctx.task.model).suggest(trial, prefix="nas_encoder")
        return cls(layers=arch.layers, heads=arch.heads, ffn=arch.ffn)

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        """A BERT-style encoder (blocks with q/k/v, output projection, FFN pair)."""
        try:
            EncoderSpace.from_model(ctx.task.model)
        except SlimkitError:
            return False
        return True


def slice_encoder(model: nn.Module, config: Encoder, task: Task | None) -> nn.Module:
    """Handler of :class:`Encoder`: the member, ranked on the task's calibration inputs when it has them."""
    inputs = list(getattr(task, "calib", ()) or ())[:config.rank_batches]
    return subnet(model, EncoderArch(config.layers, config.heads, config.ffn), rank(model, inputs))

