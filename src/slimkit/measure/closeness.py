"""How close a compressed output is to the reference: the one SQNR (and cosine) every part of slimkit uses."""

from __future__ import annotations

import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(|x| / |x - y|)`` (inf when equal)."""
    noise = float((reference.float() - approx.float()).norm())
    return math.inf if noise == 0 else 20 * math.log10(max(float(reference.float().norm()), 1e-30) / noise)


def sqnr_from_powers(signal: float | torch.Tensor, noise: float | torch.Tensor) -> float | torch.Tensor:
    """``10 log10(signal / noise)`` from summed squares (per channel when given tensors)."""
    if isinstance(signal, torch.Tensor):
        return 10 * torch.log10(signal / noise.clamp_min(1e-30))  # type: ignore[union-attr]
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of ``a`` and ``b`` (flattened when 1-D)."""
    a2, b2 = a.float().reshape(a.shape[0], -1) if a.dim() > 1 else a.float()[None], \
        b.float().reshape(b.shape[0], -1) if b.dim() > 1 else b.float()[None]
    return float(torch.nn.functional.cosine_similarity(a2, b2, dim=-1).mean())
