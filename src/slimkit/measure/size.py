"""Model size as it ships: the bytes of the saved artifact, and parameter counts.

Size is measured, never assumed: ``params x 4`` is wrong for fp16, int8, packed int4 and pruned
models alike, so we write the artifact with :func:`slimkit.io.save` and count the bytes on disk.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from slimkit import io


def artifact_size(model: nn.Module) -> int:
    """Bytes of ``model`` saved as a slimkit artifact (weights file plus metadata)."""
    with tempfile.TemporaryDirectory(prefix="slimkit-size-") as tmp:
        path = io.save(model, Path(tmp) / "model", durable=False)  # thrown away: no fsync
        return io.artifact_bytes(path)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, nonzero)`` weights; shared tensors are counted once.

    A slimkit layer that keeps its weights as integer codes, packed bits, float16 or CSR buffers
    counts the weights it stands for, so an int8 model has as many parameters as its float
    original (its bytes show in :func:`artifact_size`; bytes per parameter is their ratio).
    """
    seen: set[int] = set()
    alive: list[torch.Tensor] = []  # float twins made here stay alive, so no id() is reused while counting
    total = nonzero = 0
    stored_under: list[str] = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if any(name.startswith(prefix) for prefix in stored_under):
                continue
            tensors = stored_weights(m)
            if tensors is None:
                tensors = list(m.parameters(recurse=False))
            else:
                stored_under.append(f"{name}." if name else "")
            for t in tensors:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                alive.append(t)
                total += t.numel()
                nonzero += int(torch.count_nonzero(t).item())
    return total, nonzero


def stored_weights(m: nn.Module) -> list[torch.Tensor] | None:
    """The float weights a slimkit storage layer stands for (None: an ordinary module, count its Parameters)."""
    if not getattr(m, "slimkit_module_class", None):
        return None
    if hasattr(m, "to_float"):  # int8 / int4 Linear, Conv2d, Embedding, recurrent layers
        return list(m.to_float().parameters())
    if hasattr(m, "matrices") and hasattr(m, "matrix"):  # weight-only MultiheadAttention
        vectors = [getattr(m, n, None) for n in ("in_proj_bias", "bias_k", "bias_v", "out_proj_bias")]
        return [m.matrix(n) for n in m.matrices] + [v for v in vectors if isinstance(v, torch.Tensor)]
    if hasattr(m, "weight_csr"):  # sparse Linear: the dense shape, its nonzeros
        return [m.weight_csr.to_dense()] + ([m.bias] if m.bias is not None else [])
    weight = getattr(m, "weight", None)
    if isinstance(weight, torch.Tensor) and not isinstance(weight, nn.Parameter):  # packed bits, fp16, ...
        bias = getattr(m, "bias", None)
        return [weight] + ([bias] if isinstance(bias, torch.Tensor) else [])
    return None
