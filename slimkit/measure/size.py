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
        path = io.save(model, Path(tmp) / "model")
        return io.artifact_bytes(path)


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(total, nonzero)`` parameter counts; shared parameters are counted once.

    Only ``nn.Parameter`` tensors count; weights a quantized module keeps as buffers or packed
    params do not (their bytes still show in :func:`artifact_size`).
    """
    total = nonzero = 0
    with torch.no_grad():
        for p in model.parameters():
            total += p.numel()
            nonzero += int(torch.count_nonzero(p).item())
    return total, nonzero
