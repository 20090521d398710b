"""QuantEmbedding: an embedding table stored as int8 rows with one float32 scale per row.

In a small transformer the token table is most of the bytes (MiniLM: 11.7 M of 22.6 M params), so
an int8 model whose table stays fp32 is only ~1.5x smaller. Rows are gathered as int8 and then
dequantized, so the table is never expanded to fp32, on torch or in the exported ONNX graph
(``Gather`` on the int8 initializer, ``Cast``, ``Mul`` by the gathered scales): both runtimes
compute the same ``float(q) * scale`` and agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import SlimkitError
from slimkit.io import register_module_class
from slimkit.quantize import pack


@register_module_class("QuantEmbedding")
class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` with symmetric int8 rows: ``qweight`` (V, D) int8, ``weight_scale`` (V,) float32."""

    kernel = "int8-gather+dequant"
    fallback_reason = None

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None) -> None:
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise SlimkitError(f"QuantEmbedding({num_embeddings}, {embedding_dim}) is empty", "use positive sizes")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))  # (V, D)
        self.register_buffer("weight_scale", torch.ones(num_embeddings))  # (V,)

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> QuantEmbedding:
        """Quantize a float ``nn.Embedding`` row by row (the original is untouched)."""
        if not isinstance(emb, nn.Embedding):
            raise SlimkitError(f"QuantEmbedding.from_float needs an nn.Embedding, got {type(emb).__name__}")
        if emb.max_norm is not None:
            raise SlimkitError("an nn.Embedding with max_norm renormalises its rows at run time",
                               "exclude it from quantization (set embeddings=False)")
        m = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx)
        q, scale = pack.quantize_weight_int8(emb.weight, per_channel=True)  # per row = per "output channel"
        with torch.no_grad():
            m.qweight.copy_(q)
            m.weight_scale.copy_(scale)
        return m.eval()

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantEmbedding:
        """A module of ``spec``'s shape with placeholder buffers, to ``load_state_dict`` into."""
        return cls(spec["num_embeddings"], spec["embedding_dim"], padding_idx=spec.get("padding_idx")).eval()

    def spec(self) -> dict[str, Any]:
        """JSON-able description: with the state_dict it is everything needed to rebuild the table."""
        return {"kind": "QuantEmbedding", "num_embeddings": self.num_embeddings,
                "embedding_dim": self.embedding_dim, "padding_idx": self.padding_idx, "bits": 8,
                "activations": "none"}

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, D) float32 table, for code that reads ``embeddings.weight`` (e.g. its dtype)."""
        return self.dequantized_weight()

    def dequantized_weight(self) -> torch.Tensor:
        return pack.dequantize_int8(self.qweight, self.weight_scale)  # (V, D)

    def to_float(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the dequantized table."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            emb.weight.copy_(self.dequantized_weight())
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.qweight)  # (..., D) int8: only the looked-up rows
        scale = F.embedding(ids, self.weight_scale.unsqueeze(1))  # (..., 1)
        return rows.to(torch.float32) * scale  # (..., D)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows, padding_idx={self.padding_idx}"


__all__ = ["QuantEmbedding"]
