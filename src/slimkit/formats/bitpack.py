"""1-bit and 2-bit packing: 8 or 4 weights per byte, so binary / ternary layers really are small.

Row-wise: each output row of ``K`` codes becomes ``ceil(K * bits / 8)`` bytes (the row is padded
with zero codes to a whole byte); code ``j`` of a row sits in byte ``j // per`` at bit offset
``(j % per) * bits``, least significant first (``per = 8 // bits``). ``unpack_bits`` is the exact
inverse given ``K``.
"""

from __future__ import annotations

import torch

from slimkit.core.errors import SlimkitError

BITS = (1, 2)


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of ``k`` codes."""
    per = 8 // bits
    return (k + per - 1) // per


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) integer codes in [0, 2**bits) -> (N, ceil(K*bits/8)) uint8."""
    if bits not in BITS:
        raise SlimkitError(f"bit packing supports {BITS} bits, not {bits}", "use 1 (binary) or 2 (ternary)")
    if codes.ndim != 2:
        raise SlimkitError(f"pack_bits needs (N, K) codes, got shape {tuple(codes.shape)}", "flatten rows first")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise SlimkitError(f"codes outside [0, {2 ** bits}) cannot be packed in {bits} bit(s)", "check the codes")
    n, k = codes.shape
    per = 8 // bits
    width = packed_width(k, bits)
    padded = torch.zeros(n, width * per, dtype=torch.uint8, device=codes.device)
    padded[:, :k] = codes.to(torch.uint8)
    lanes = padded.reshape(n, width, per)  # (N, B, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits  # (per,)
    return (lanes << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)  # disjoint bits: sum == or


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """(N, B) uint8 -> (N, K) uint8 codes; the exact inverse of ``pack_bits`` for rows of ``k`` codes."""
    if bits not in BITS:
        raise SlimkitError(f"bit packing supports {BITS} bits, not {bits}", "use 1 (binary) or 2 (ternary)")
    per = 8 // bits
    if packed.shape[1] != packed_width(k, bits):
        raise SlimkitError(f"{packed.shape[1]} bytes per row do not hold {k} codes of {bits} bit(s)",
                           "pass the K the codes were packed with")
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits  # (per,)
    codes = (packed.unsqueeze(-1) >> shifts) & (2 ** bits - 1)  # (N, B, per)
    return codes.reshape(packed.shape[0], -1)[:, :k]


__all__ = ["BITS", "pack_bits", "packed_width", "unpack_bits"]
