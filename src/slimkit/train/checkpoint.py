"""Atomic training checkpoints: a kill at any moment leaves either the old file or the new one.

Written to a temp file in the same directory, flushed to disk, then ``os.replace``d over the
target (atomic on POSIX and Windows). Read back with ``torch.load(weights_only=True)`` so a
checkpoint file can never run code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from slimkit.core.atomic import atomic_write
from slimkit.core.errors import SlimkitError

CHECKPOINT = "finetune.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` to ``path`` atomically; leftovers of writes killed earlier are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    return atomic_write(path, lambda f: torch.save(state, f), sync=True)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; damaged files give a one-line error."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SlimkitError(f"no checkpoint at {path}", "start without resume=True") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise SlimkitError(f"checkpoint {path} is unreadable ({type(e).__name__})",
                           "delete it to start over") from None
    if not isinstance(state, dict) or "step" not in state:
        raise SlimkitError(f"checkpoint {path} is not a slimkit fine-tuning checkpoint", "delete it to start over")
    return state
