"""A compact Llama-shaped decoder with a static KV cache, for measuring decode speed of the GPU schemes.

Llama-3-8B's shape by default (hidden 4096, FFN 14336, 32 layers, 32 query heads sharing 8 KV
heads, vocab 128256, RoPE theta 500000): 8.03 B parameters. Weights are random (speed only).
Query/key/value and gate/up projections are fused Linears (``wqkv``, ``w13``) so one decode step
reads each weight with one kernel; every projection is an ``nn.Linear`` for ``build_cuda`` to convert.

Shapes are static so a decode step can be compiled and captured in a CUDA graph: the cache holds
``max_len`` positions, new keys/values are written at ``pos`` with ``index_copy_``, and attention
always spans the whole cache with a mask ``key position <= query position``, built once per step as
the additive float mask attention takes (not once per layer: at batch 1 every small kernel a layer
launches is time the weights' bytes do not account for). RoPE follows the Hugging Face Llama
convention (rotate the two halves of each head).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab: int = 128256
    hidden: int = 4096
    ffn: int = 14336
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


LLAMA3_8B = DecoderConfig()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, T, heads, D) with cos/sin (T, D/2), halves convention."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, h, D/2) each
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=False)
        # Non-persistent buffers (not weights): torch.compile treats them as inputs, so one compiled
        # layer serves all layers, and in-place cache writes stay inside the compiled graph.
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        d = self.head_dim
        kv, g = self.kv_heads, self.heads // self.kv_heads  # query heads kv*g .. kv*g + g-1 share KV head kv
        q, k, v = self.wqkv(x).split([self.heads * d, kv * d, kv * d], dim=-1)
        q = _rotate(q.view(b, t, self.heads, d), cos, sin)  # (B, T, H, D)
        k = _rotate(k.view(b, t, kv, d), cos, sin).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(b, t, kv, d).transpose(1, 2)  # (B, KV, T, D)
        self.k_cache.index_copy_(2, pos, k.to(self.k_cache.dtype))  # (B, KV, Tmax, D)
        self.v_cache.index_copy_(2, pos, v.to(self.v_cache.dtype))
        # GQA without copying the cache per query head: each KV head's g query heads become g*T query rows.
        q = q.view(b, t, kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)  # (B, KV, G*T, D)
        y = attend(q, self.k_cache, self.v_cache, mask)  # (B, KV, G*T, D)
        y = y.view(b, kv, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, self.heads * d)  # (B, T, H*D)
        return self.wo(y)  # (B, T, C)


#: Up to this many query rows per KV head (decode), attention is written out as softmax(QK^T)V, which
#: torch.compile fuses; torch's SDPA kernel at 4 rows x 512 keys x 8 heads leaves most of an H100 idle
#: (8B shape, batch 1: bf16 150 -> 157 tok/s, int4 297 -> 325). Prefill keeps SDPA (flash/efficient).
DECODE_ROWS = 64


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention of q (B, KV, R, D) over k, v (B, KV, Tmax, D) with an additive (.., R, Tmax) mask."""
    if q.shape[-2] > DECODE_ROWS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5 + mask  # (B, KV, R, Tmax) fp32
    return torch.softmax(scores, dim=-1).to(q.dtype) @ v  # (B, KV, R, D)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.w13 = nn.Linear(cfg.hidden, 2 * cfg.ffn, bias=False)  # gate and up, fused
        self.w2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), cos, sin, pos, mask)  # (B, T, C)
        gate, up = self.w13(self.ffn_norm(h)).chunk(2, dim=-1)  # (B, T, F) each
        return h + self.w2(F.silu(gate) * up)


def run_block(block: Block, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """One layer; the unit that ``torch.compile`` compiles once and reuses for all layers."""
    return block(x, cos, sin, pos, mask)


class Decoder(nn.Module):
    """``forward(tokens (B, T) int64, pos (T,) int64) -> logits (B, T, vocab)``; call ``setup_cache`` first."""

    def __init__(self, cfg: DecoderConfig = LLAMA3_8B) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        self.block_fn: Callable[..., torch.Tensor] = run_block
        self.max_len = 0
        for name in ("cos", "sin", "key_pos"):
            self.register_buffer(name, None, persistent=False)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> None:
        """Zeroed (B, KV, max_len, D) caches and RoPE tables for ``max_len`` positions, on the model's device."""
        cfg, dev = self.cfg, self.embed.weight.device
        for blk in self.layers:
            shape = (batch, cfg.kv_heads, max_len, cfg.head_dim)
            blk.attn.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
            blk.attn.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=dev).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(max_len, device=dev).float(), inv)  # (Tmax, D/2)
        self.cos, self.sin = angles.cos(), angles.sin()
        self.key_pos = torch.arange(max_len, device=dev)  # (Tmax,)
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.max_len:
            raise RuntimeError("call setup_cache(batch, max_len) before running the decoder")
        x = self.embed(tokens)  # (B, T, C)
        cos, sin = self.cos[pos], self.sin[pos]  # (T, D/2)
        mask = attention_mask(self.key_pos, pos, self.cfg.heads // self.cfg.kv_heads, x.dtype)  # (1, 1, G*T, Tmax)
        for blk in self.layers:
            x = self.block_fn(blk, x, cos, sin, pos, mask)
        return self.output(self.norm(x))  # (B, T, V)


def attention_mask(key_pos: torch.Tensor, pos: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, G*T, Tmax) mask: 0 where ``key position <= query position``, -inf elsewhere; rows
    repeat per query head of a KV group (the attention's G*T query rows)."""
    allowed = key_pos[None, :] <= pos[:, None]  # (T, Tmax)
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    return torch.where(allowed, zero, float("-inf")).to(dtype).repeat(group, 1)[None, None]


def count_params(cfg: DecoderConfig) -> int:
    """Parameters of ``Decoder(cfg)``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(cfg).parameters())


__all__ = ["LLAMA3_8B", "Decoder", "DecoderConfig", "attend", "attention_mask", "count_params", "run_block"]
