"""The versions an artifact or a report was made with."""

from __future__ import annotations

import platform

import torch

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    return {"slimkit": __version__, "torch": torch.__version__, "python": platform.python_version()}
