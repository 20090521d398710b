"""Read a ``.pt`` / ``.pth`` checkpoint someone else wrote, without ever running pickled code."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError


def read_torch_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth`` checkpoint without ever running pickled code.

    Only ``torch.load(weights_only=True)`` touches the file; anything it refuses (a pickle
    that would import or call something) is reported as unsafe, not executed.
    """
    path = Path(path)
    if not path.is_file():
        raise SlimkitError(f"no file at {path}", "check the path")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "Unsupported" in line or "global" in line.lower()), "")
        raise SlimkitError(f"{path} holds code, not just weights; refusing to load it"
                           + (f" ({detail.strip()[:120]})" if detail else ""),
                           "load it only if you trust its author, then re-save with slimkit.save") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise SlimkitError(f"{path} is corrupt or truncated ({first})", "re-save or re-download the model") from None
    if isinstance(obj, nn.Module):  # weights_only never yields this, but be explicit
        raise SlimkitError(f"{path} holds a whole module", "save a state_dict instead")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SlimkitError(f"{path} is not a state_dict of tensors", "save model.state_dict() to the file")
    return obj
