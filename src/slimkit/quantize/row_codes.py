"""Symmetric per-row integer codes for a float matrix: the storage of the weight-only layers that have no
integer kernel anywhere (transposed convs, a MultiheadAttention's own projections). int8 codes are
stored as they are; int4 codes (-7..7) packed two to a byte. One scale per row, rounded to nearest."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slimkit.formats.pack import pack_int4, unpack_int4

LEVELS = {8: 127, 4: 7}
INT4_OFFSET = 8


def symmetric_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) -> (float integer levels in -L..L (N, K), step max|row|/L (N,)), rounded to nearest."""
    w = w.detach().float()
    scale = (w.abs().amax(1) / LEVELS[bits]).clamp_min(1e-12)                # (N,)
    q = torch.round(w / scale[:, None]).clamp(-LEVELS[bits], LEVELS[bits])  # (N, K)
    return q, scale


def encode_rows(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) -> (codes int8 (N, K) or packed uint8 (N, ceil(K/2)), scale (N,))."""
    q, scale = symmetric_rows(w, bits)
    if bits == 8:
        return q.to(torch.int8), scale
    padded = F.pad(q + INT4_OFFSET, (0, q.shape[1] % 2))                     # (N, K even), codes 1..15
    return pack_int4(padded.to(torch.uint8)), scale


def decode_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The float (N, ``cols``) matrix the codes stand for."""
    q = codes.float() if bits == 8 else unpack_int4(codes)[:, :cols].float() - INT4_OFFSET
    return q * scale[:, None]


def empty_codes(rows: int, cols: int, bits: int) -> torch.Tensor:
    """A zero buffer shaped like ``encode_rows``' codes (for rebuilding a saved layer)."""
    if bits == 8:
        return torch.zeros(rows, cols, dtype=torch.int8)
    return torch.zeros(rows, (cols + 1) // 2, dtype=torch.uint8)


__all__ = ["LEVELS", "decode_rows", "empty_codes", "encode_rows", "symmetric_rows"]
