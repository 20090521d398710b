"""Weight-only int8 / int4 for ``nn.MultiheadAttention``.

torch's MultiheadAttention reads its projection weights directly (``in_proj_weight``, or
``q/k/v_proj_weight``, and ``out_proj.weight``) inside ``F.multi_head_attention_forward``, so its
projections cannot be swapped for quantized Linear layers. This layer stores those matrices as
per-row integer codes and hands their dequantized form to the same function: the same interface
(batch_first, masks, need_weights, is_causal), about 4x (int8) or 8x (int4) fewer weight bytes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.editing import select, set_submodule
from slimkit.core.registry import layer_class
from slimkit.quantize.row_codes import decode_rows, empty_codes, encode_rows

_FLOAT = ("in_proj_bias", "bias_k", "bias_v", "out_proj_bias")


@layer_class("QuantMultiheadAttention")
class QuantMultiheadAttention(nn.Module):
    """A MultiheadAttention whose projection matrices are int8 / packed int4 codes with per-row scales."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)
        self.embed_dim, self.num_heads, self.bits = spec["embed_dim"], spec["num_heads"], spec["bits"]
        self.batch_first, self.dropout, self.add_zero_attn = spec["batch_first"], spec["dropout"], spec["add_zero_attn"]
        self.matrices = {name: tuple(shape) for name, shape in spec["matrices"].items()}  # name -> (rows, cols)
        for name, (rows, cols) in self.matrices.items():
            self.register_buffer(f"{name}_codes", empty_codes(rows, cols, self.bits))
            self.register_buffer(f"{name}_scale", torch.ones(rows))
        for name in _FLOAT:
            shape = spec["vectors"].get(name)
            self.register_buffer(name, None if shape is None else torch.zeros(*shape))

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantMultiheadAttention:
        return cls(spec).eval()

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, bits: int) -> QuantMultiheadAttention:
        matrices = {"out_proj_weight": mha.out_proj.weight}
        if mha._qkv_same_embed_dim:
            matrices["in_proj_weight"] = mha.in_proj_weight                    # (3E, E)
        else:
            matrices.update(q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight,
                            v_proj_weight=mha.v_proj_weight)                   # (E, E), (E, kdim), (E, vdim)
        vectors = {"in_proj_bias": mha.in_proj_bias, "bias_k": mha.bias_k, "bias_v": mha.bias_v,
                   "out_proj_bias": mha.out_proj.bias}
        spec = {"embed_dim": mha.embed_dim, "num_heads": mha.num_heads, "bits": bits, "batch_first": mha.batch_first,
                "dropout": mha.dropout, "add_zero_attn": mha.add_zero_attn,
                "matrices": {n: list(w.shape) for n, w in matrices.items()},
                "vectors": {n: list(v.shape) for n, v in vectors.items() if v is not None}}
        out = cls(spec)
        with torch.no_grad():
            for name, w in matrices.items():
                codes, scale = encode_rows(w, bits)
                getattr(out, f"{name}_codes").copy_(codes)
                getattr(out, f"{name}_scale").copy_(scale)
            for name, v in vectors.items():
                if v is not None:
                    getattr(out, name).copy_(v.detach())
        return out.to(mha.out_proj.weight.device).eval()

    def spec(self) -> dict[str, Any]:
        return {"kind": "QuantMultiheadAttention", **self._spec, "activations": "none"}

    def matrix(self, name: str) -> torch.Tensor:
        """The float projection ``name`` (e.g. ``in_proj_weight``) the codes stand for."""
        rows, cols = self.matrices[name]
        return decode_rows(getattr(self, f"{name}_codes"), getattr(self, f"{name}_scale"), self.bits, cols)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:  # (B, L, E) -> (L, B, E), as torch's own forward does
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        w = {name: self.matrix(name).to(query.dtype) for name in self.matrices}
        separate = "in_proj_weight" not in w
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, w.get("in_proj_weight"), self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, w["out_proj_weight"], self.out_proj_bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate, q_proj_weight=w.get("q_proj_weight"),
            k_proj_weight=w.get("k_proj_weight"), v_proj_weight=w.get("v_proj_weight"),
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)      # (L, B, E) -> (B, L, E)
        return out, weights


def attention_targets(model: nn.Module, targets: Any, exclude: Any) -> list[str]:
    """The MultiheadAttention layers a quantizer's ``targets`` reach ("all": every one; "all-linear": none)."""
    if targets == "all-linear":
        return []
    return select(model, ".*" if targets == "all" else targets, exclude, kinds=(nn.MultiheadAttention,))


def quantize_attention(model: nn.Module, names: list[str], bits: int, skipped: dict[str, str]) -> dict[str, nn.Module]:
    """Replace each named MultiheadAttention by its weight-only form; returns the originals by name."""
    originals = {}
    for name in names:
        mha = model.get_submodule(name)
        set_submodule(model, name, QuantMultiheadAttention.from_float(mha, bits))
        for listed in [n for n in skipped if n == name or n.startswith(name + ".")]:
            del skipped[listed]  # the MultiheadAttention and the projection it read directly
        originals[name] = mha
    return originals


__all__ = ["QuantMultiheadAttention", "attention_targets", "quantize_attention"]
