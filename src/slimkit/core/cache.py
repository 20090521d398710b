"""Where slimkit keeps what it computes once: trained zoo models, reference embeddings."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """``$SLIMKIT_CACHE``, else ``$XDG_CACHE_HOME/slimkit``, else ``~/.cache/slimkit``."""
    root = os.environ.get("SLIMKIT_CACHE")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "slimkit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts: a cache key that changes when any input changes."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
