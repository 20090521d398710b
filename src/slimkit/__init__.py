"""slimkit: make trained PyTorch models smaller and faster, and prove it with measurements.

``import slimkit`` is light (no torch): the public names below are imported on first use (PEP 562),
so ``slimkit --help`` answers at once. Every built-in technique family is still registered before
anything looks one up: the registry's first lookup imports them (``slimkit.core.registry``), and
no family imports a heavy optional dependency (transformers, onnxruntime, optuna, ...) until it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module it lives in; the technique families are themselves the modules.
_PUBLIC = {
    "BaseConfig": "slimkit.core.config", "apply": "slimkit.core.config", "registered_configs": "slimkit.core.config",
    "technique": "slimkit.core.config", "SlimkitError": "slimkit.core.errors", "builder": "slimkit.core.registry",
    "layer_class": "slimkit.core.registry", "Measurement": "slimkit.core.target", "Target": "slimkit.core.target",
    "Task": "slimkit.core.task", "__version__": "slimkit.core.versions", "load": "slimkit.io", "save": "slimkit.io",
    "Profile": "slimkit.measure", "profile": "slimkit.measure", "Recipe": "slimkit.pipeline.recipe",
    "optimize": "slimkit.search",
}
_FAMILIES = ("architecture", "distill", "factorize", "nas", "prune", "quantize", "train", "zoo")


def __getattr__(name: str) -> Any:
    if name in _FAMILIES:
        return importlib.import_module(f"slimkit.{name}")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'slimkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


__all__ = sorted([*_PUBLIC, *_FAMILIES])
