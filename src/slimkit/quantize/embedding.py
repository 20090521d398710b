"""QuantEmbedding: an embedding table stored as int8 rows (one float32 scale per row) or as 4-bit
codes in groups along the embedding dim.

In a small transformer the token table is most of the bytes (MiniLM: 11.7 M of 22.6 M params), so
an int8 model whose table stays fp32 is only ~1.5x smaller. Rows are gathered in their stored
integer form and then dequantized, so the table is never expanded to float, on torch or in the
exported ONNX graph (``Gather`` on the integer initializer, then elementwise ops on the gathered
rows only): both runtimes compute the same numbers and agree bit for bit.

4-bit format (``bits=4``, ``group_size`` g dividing D), asymmetric per group of g values in a row:
``w ≈ (q - zero) * scale`` with ``q`` in [0, 15] packed two per byte by ``pack.pack_int4``
(element 2j in the low nibble), ``zero`` an integer in [0, 15] stored as uint8 and ``scale``
stored as float16. Why this choice, measured on MiniLM's word table (Gaussian-like rows; random
normal rows give the same numbers to 0.05 dB), SQNR at g=32:

    symmetric, [-7, 7] * amax/7          20.26 dB   4.5 bits/value
    symmetric, [-8, 7] * amax/8          20.57 dB   4.5 bits/value
    asymmetric, uint8 zero (chosen)      21.86 dB   4.75 bits/value
    asymmetric, float16 zero             22.13 dB   5.0 bits/value

Asymmetric spends all 16 levels on [min, max] of the group, +1.3 dB over the best symmetric
form; an integer zero keeps the offset an exact integer subtraction and costs 0.3 dB against a
float zero for half the zero-point bytes. float16 scales match float32 scales to 0.01 dB
(tests/quantize/test_embedding.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import layer_class
from slimkit.formats import pack

BITS = (8, 4)
INT4_LEVELS = 15
#: Default 4-bit group along the embedding dim: 0.75 bits of scale + zero per value at 21.9 dB.
GROUP_SIZE = 32


@layer_class("QuantEmbedding")
class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` with quantized rows.

    ``bits=8``: ``qweight`` (V, D) int8 symmetric, ``weight_scale`` (V,) float32.
    ``bits=4``: ``qweight`` (V, D/2) uint8 packed codes, ``weight_scale`` (V, D/g) float16,
    ``weight_zero`` (V, D/g) uint8 (see the module docstring for why).
    """

    fallback_reason = None

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 bits: int = 8, group_size: int = GROUP_SIZE, name: str = "") -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise SlimkitError(f"QuantEmbedding({num_embeddings}, {embedding_dim}) is empty", "use positive sizes")
        if bits not in BITS:
            raise SlimkitError(f"QuantEmbedding bits={bits!r} is not supported", "use 8 or 4")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.bits = bits
        self.group_size = 0 if bits == 8 else _check_group(embedding_dim, group_size, name)
        v, d = num_embeddings, embedding_dim
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(v, d, dtype=torch.int8))  # (V, D)
            self.register_buffer("weight_scale", torch.ones(v))  # (V,)
        else:
            groups = d // self.group_size
            self.register_buffer("qweight", torch.zeros(v, d // 2, dtype=torch.uint8))  # (V, D/2)
            self.register_buffer("weight_scale", torch.ones(v, groups, dtype=torch.float16))  # (V, G)
            self.register_buffer("weight_zero", torch.zeros(v, groups, dtype=torch.uint8))  # (V, G)

    @property
    def kernel(self) -> str:
        return "int8-gather+dequant" if self.bits == 8 else "int4-gather+unpack+dequant"

    @classmethod
    def from_float(cls, emb: nn.Embedding, *, bits: int = 8, group_size: int = GROUP_SIZE,
                   name: str = "") -> QuantEmbedding:
        """Quantize a float ``nn.Embedding`` (the original is untouched); ``name`` is for error messages."""
        if not isinstance(emb, nn.Embedding):
            raise SlimkitError(f"QuantEmbedding.from_float needs an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise SlimkitError("an nn.Embedding with max_norm renormalises its rows at run time",
                               "exclude it from quantization (set embeddings=False)")
        m = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, bits=bits,
                group_size=group_size, name=name)
        with torch.no_grad():
            if bits == 8:
                q, scale = pack.quantize_weight_int8(emb.weight, per_channel=True)  # per row = per "channel"
                m.qweight.copy_(q)
                m.weight_scale.copy_(scale)
            else:
                q, scale, zero = quantize_rows_int4(emb.weight, m.group_size)
                m.qweight.copy_(q)
                m.weight_scale.copy_(scale)
                m.weight_zero.copy_(zero)
        return m.eval()

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantEmbedding:
        """A module of ``spec``'s shape with placeholder buffers, to ``load_state_dict`` into."""
        return cls(spec["num_embeddings"], spec["embedding_dim"], padding_idx=spec.get("padding_idx"),
                   bits=spec.get("bits", 8), group_size=spec.get("group_size", GROUP_SIZE)).eval()

    def spec(self) -> dict[str, Any]:
        """JSON-able description: with the state_dict it is everything needed to rebuild the table."""
        out = {"kind": "QuantEmbedding", "num_embeddings": self.num_embeddings,
               "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx, "bits": self.bits,
               "activations": "none"}
        if self.bits == 4:
            out["group_size"] = self.group_size
        return out

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, D) float32 table, for code that reads ``embeddings.weight`` (e.g. its dtype)."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return pack.dequantize_int8(self.qweight, self.weight_scale)  # (V, D)
        return self._dequantize(self.qweight, self.weight_scale, self.weight_zero)  # (V, D)

    def to_float(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the dequantized table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            emb.weight.copy_(self.dequantized_weight())
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            rows = F.embedding(ids, self.qweight)  # (..., D) int8: only the looked-up rows
            scale = F.embedding(ids, self.weight_scale.unsqueeze(1))  # (..., 1)
            return rows.to(torch.float32) * scale  # (..., D)
        packed = F.embedding(ids, self.qweight)  # (..., D/2) uint8: only the looked-up rows
        scale = F.embedding(ids, self.weight_scale)  # (..., G) float16
        zero = F.embedding(ids, self.weight_zero)  # (..., G) uint8
        return self._dequantize(packed, scale, zero)

    def _dequantize(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """(..., D/2) codes, (..., G) scales and zeros -> (..., D) float32, in ops every ONNX runtime has.

        An integer ``Div`` by 16 and a subtraction unpack the nibbles (no bit ops: ONNX ``BitShift`` is
        uint-only and not in every runtime; truncating division of non-negative codes exports as one
        op where floor division and ``%`` export with sign fixes that cost ~25 ms per MiniLM batch on
        ONNX Runtime), the zero is subtracted in int32 (exact), one float multiply rounds.
        """
        lead, groups = packed.shape[:-1], scale.shape[-1]
        p = packed.to(torch.int32)  # (..., D/2), all >= 0
        high = torch.div(p, 16, rounding_mode="trunc")  # one ONNX Div (floor / % add sign-fixing ops)
        codes = torch.stack([p - high * 16, high], dim=-1)  # (..., D/2, 2)
        codes = codes.reshape(*lead, groups, self.group_size)  # (..., G, g)
        centred = codes - zero.to(torch.int32).unsqueeze(-1)  # (..., G, g) in [-15, 15]
        out = centred.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)  # (..., G, g)
        return out.reshape(*lead, self.embedding_dim)  # (..., D)

    def extra_repr(self) -> str:
        form = "int8 rows" if self.bits == 8 else f"int4 groups of {self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, {form}, padding_idx={self.padding_idx}"


def _check_group(dim: int, group_size: int, name: str) -> int:
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or dim % group_size:
        table = f"embedding {name!r}" if name else "embedding table"
        raise SlimkitError(f"4-bit {table}: embedding_dim {dim} is not a multiple of group_size {group_size}",
                           "use an even group_size that divides it (e.g. 32), or embedding_bits=8")
    return group_size


def quantize_rows_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit per group: ``(packed uint8 (V, D/2), scale float16 (V, G), zero uint8 (V, G))``.

    The group's range is widened to include 0 (so the integer zero ``round(-min / scale)`` lies in
    [0, 15] even for a group of one sign) and the scale is rounded to float16 *before* the codes
    are chosen, so the codes are the best ones for the scale that is stored.
    """
    v, d = w.shape
    g = _check_group(d, group_size, "")
    wg = w.detach().float().reshape(v, d // g, g)  # (V, G, g)
    if not torch.isfinite(wg).all():
        raise SlimkitError("embedding table contains NaN or Inf", "fix the model before quantizing it")
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # (V, G); 0 inside, so zero is in [0, 15]
    tiny = float(torch.finfo(torch.float16).tiny)
    scale = ((hi - lo) / INT4_LEVELS).clamp_min(tiny).to(torch.float16)  # (V, G)
    if not torch.isfinite(scale).all():
        raise SlimkitError(f"embedding values up to {float(wg.abs().max()):.3g} overflow float16 scales",
                           "use embedding_bits=8 for this table")
    scale = torch.where(hi > lo, scale, torch.ones_like(scale))  # an all-zero group: codes 0, zero 0, exact
    s = scale.float()
    zero = torch.round(-lo / s).clamp(0, INT4_LEVELS)  # (V, G)
    q = torch.round(wg / s[..., None] + zero[..., None]).clamp(0, INT4_LEVELS)  # (V, G, g)
    return pack.pack_int4(q.reshape(v, d)), scale, zero.to(torch.uint8)


__all__ = ["GROUP_SIZE", "QuantEmbedding", "quantize_rows_int4"]
