"""Sparse tensor storage for artifacts: bitmask + values, or CSR, whichever is smaller.

Pruning only shrinks a model on disk if the zeros are not written. Each encoded tensor is
stored as a few plain dense parts (safetensors has no sparse type) and decoded bit-exactly:

    bitmask  ``mask`` uint8 (ceil(numel / 8),) little-endian bits + ``values`` (nnz,)
    csr      ``crow`` int32 (rows + 1,) + ``col`` int16/int32 (nnz,) + ``values`` (nnz,)

CSR views the tensor as (shape[0], numel / shape[0]). "Zero" means an all-zero bit pattern,
so ``-0.0`` and NaN are kept as values and the round trip is bit-identical, not just equal.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from slimkit.core.errors import SlimkitError

FORMATS = ("bitmask", "csr")
#: Separator between a tensor's name and its part in the weights file (never in module names).
SEP = "::"
#: Auto mode leaves small tensors dense: the file header of extra parts eats the saving.
MIN_NUMEL = 1024
#: Auto mode encodes a tensor only when that saves at least this fraction of its bytes.
MIN_SAVING = 0.25
#: No tensor slimkit stores has more dimensions; a description with more is corrupt.
MAX_DIMS = 8

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Bool (numel,): True where the element's bits are not all zero."""
    flat = t.reshape(-1)
    return flat.view(_INT_VIEW[flat.element_size()]) != 0


def _csr_rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def _col_dtype(cols: int) -> torch.dtype:
    return torch.int16 if cols <= 2**15 else torch.int32


def encoded_bytes(numel: int, nnz: int, element_size: int, shape: tuple[int, ...]) -> dict[str, int]:
    """Bytes each format needs for a tensor with ``nnz`` non-zeros (dense included, to compare)."""
    rows, cols = _csr_rows_cols(shape)
    col_size = torch.tensor([], dtype=_col_dtype(cols)).element_size()
    return {"dense": numel * element_size,
            "bitmask": math.ceil(numel / 8) + nnz * element_size,
            "csr": (rows + 1) * 4 + nnz * (col_size + element_size)}


def choose(t: torch.Tensor) -> str | None:
    """The smaller sparse format for ``t``, or None when storing it dense is as good."""
    if not t.is_floating_point() or t.numel() < MIN_NUMEL or t.dim() == 0:
        return None
    nnz = int(_nonzero_mask(t).sum())
    sizes = encoded_bytes(t.numel(), nnz, t.element_size(), tuple(t.shape))
    best = min(FORMATS, key=lambda f: sizes[f])
    return best if sizes[best] <= (1 - MIN_SAVING) * sizes["dense"] else None


def encode(t: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """Parts (part name -> dense tensor) that :func:`decode` turns back into ``t`` bit for bit."""
    if fmt not in FORMATS:
        raise SlimkitError(f"unknown sparse format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    t = t.detach().to("cpu").contiguous()
    keep = _nonzero_mask(t)  # (numel,)
    values = t.reshape(-1)[keep].clone()  # (nnz,)
    if fmt == "bitmask":
        pad = (-keep.numel()) % 8
        bits = torch.cat([keep, keep.new_zeros(pad)]).view(-1, 8).to(torch.uint8)  # (numel/8, 8)
        return {"mask": (bits * _BITS).sum(-1, dtype=torch.uint8), "values": values}
    rows, cols = _csr_rows_cols(tuple(t.shape))
    keep2d = keep.view(rows, cols)  # (rows, cols)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = keep2d.sum(1).cumsum(0)
    col = keep2d.nonzero()[:, 1]  # (nnz,) row-major, so grouped by row
    return {"crow": crow.to(torch.int32), "col": col.to(_col_dtype(cols)), "values": values}


def decode(parts: Mapping[str, torch.Tensor], info: Mapping[str, Any], *, name: str = "tensor",
           expected: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rebuild a tensor from its parts; any inconsistency is a :class:`SlimkitError`, never garbage.

    ``expected``: the shape the receiving model holds. The description's shape is untrusted (a
    CSR of one row can claim billions of columns in a few bytes), so with ``expected`` nothing is
    allocated for a shape the model does not hold.
    """

    def bad(why: str) -> SlimkitError:
        return SlimkitError(f"sparse tensor {name} is corrupt ({why})", "re-save the model")

    fmt, shape, dtype_name = info.get("format"), info.get("shape"), info.get("dtype")
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) and dtype_name.isidentifier() else None
    if (fmt not in FORMATS or not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(s) is int and s >= 0 for s in shape) or not isinstance(dtype, torch.dtype)):
        raise bad(f"unreadable description {str(dict(info))[:200]}")
    shape_t = tuple(shape)
    if expected is not None and shape_t != tuple(expected):
        raise bad(f"shape {shape_t} where the model holds {tuple(expected)}")
    numel = math.prod(shape_t)
    values = parts.get("values")
    if values is None or values.dtype != dtype or values.dim() != 1:
        raise bad("values missing or of the wrong dtype")
    nnz = values.numel()
    if fmt == "bitmask":
        mask = parts.get("mask")
        if mask is None or mask.dtype != torch.uint8 or mask.numel() != math.ceil(numel / 8):
            raise bad("bitmask missing or of the wrong length")
        keep = ((mask[:, None] & _BITS) != 0).reshape(-1)[:numel]  # (numel,)
        if int(keep.sum()) != nnz:
            raise bad(f"bitmask marks {int(keep.sum())} values, {nnz} stored")
        out = torch.zeros(numel, dtype=dtype)
        out[keep] = values
        return out.view(shape_t)
    crow, col = parts.get("crow"), parts.get("col")
    rows, cols = _csr_rows_cols(shape_t)
    if crow is None or col is None or crow.numel() != rows + 1 or col.numel() != nnz:
        raise bad("CSR index arrays missing or of the wrong length")
    crow64, col64 = crow.to(torch.int64), col.to(torch.int64)
    counts = crow64.diff()
    if int(crow64[0]) != 0 or int(crow64[-1]) != nnz or bool((counts < 0).any()):
        raise bad("row pointers are not a valid CSR row index")
    if nnz and (int(col64.min()) < 0 or int(col64.max()) >= cols):
        raise bad("column index out of range")
    row = torch.repeat_interleave(torch.arange(rows), counts)  # (nnz,)
    flat = row * cols + col64
    if nnz > 1 and not bool((flat.diff() > 0).all()):
        raise bad("column indices are not sorted and unique within rows")
    out = torch.zeros(numel, dtype=dtype)
    out[flat] = values
    return out.view(shape_t)


def pack_state(state: Mapping[str, torch.Tensor], sparse: bool | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Split a state dict into stored tensors + descriptions of the encoded ones.

    ``sparse=None`` encodes every tensor where that saves bytes (see :func:`choose`);
    ``True`` also encodes small tensors when smaller at all; ``False`` stores everything dense.
    """
    stored: dict[str, torch.Tensor] = {}
    encoded: dict[str, dict[str, Any]] = {}
    for name, t in state.items():
        fmt = None
        if sparse is None:
            fmt = choose(t)
        elif sparse and t.is_floating_point() and t.dim() > 0:
            nnz = int(_nonzero_mask(t).sum())
            sizes = encoded_bytes(t.numel(), nnz, t.element_size(), tuple(t.shape))
            best = min(FORMATS, key=lambda f: sizes[f])
            fmt = best if sizes[best] < sizes["dense"] else None
        if fmt is None:
            stored[name] = t
            continue
        if SEP in name:
            raise SlimkitError(f"tensor name {name!r} contains {SEP!r}", "rename the module")
        for part, value in encode(t, fmt).items():
            stored[f"{name}{SEP}{part}"] = value
        nnz = int(_nonzero_mask(t).sum())
        encoded[name] = {"format": fmt, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                         "nnz": nnz}
    return stored, encoded


def check_sparse_parts(source: str, with_parts: set[str], dense: Mapping[str, Any], encoded: Mapping[str, Any]) -> None:
    """Stored sparse parts and their metadata descriptions name the same tensors, none also stored dense."""
    orphans = sorted(with_parts - set(encoded))
    if orphans:
        raise SlimkitError(f"{source}: sparse parts of {orphans[0]} have no description in the metadata",
                           "the weights and metadata files do not belong together; re-save the model")
    for name in encoded:
        if name not in with_parts:
            raise SlimkitError(f"{source}: sparse tensor {name} is described but not stored",
                               "the weights and metadata files do not belong together; re-save the model")
        if name in dense:
            raise SlimkitError(f"{source}: {name} is stored both dense and sparse", "re-save the model")


def unpack_state(stored: Mapping[str, torch.Tensor], encoded: Mapping[str, Mapping[str, Any]], *,
                 source: str = "artifact", shapes: Mapping[str, tuple[int, ...]] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state`: decode every described tensor, pass the rest through.

    ``shapes`` (tensor name -> shape the model holds) bounds what decoding allocates; a described
    tensor the model does not hold is an error before anything is decoded.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        name, sep, part = key.rpartition(SEP)
        if sep:
            parts.setdefault(name, {})[part] = t
        else:
            state[key] = t
    check_sparse_parts(source, set(parts), state, encoded)
    for name, info in encoded.items():
        if shapes is not None and name not in shapes:
            raise SlimkitError(f"{source}: sparse tensor {name} is not in the model", "load it into the architecture "
                               "it was saved from")
        state[name] = decode(parts[name], info, name=f"{name} in {source}",
                             expected=None if shapes is None else shapes[name])
    return state


def sparsity(t: torch.Tensor) -> float:
    """Fraction of elements whose value is exactly zero."""
    return float((t == 0).sum()) / max(t.numel(), 1)
