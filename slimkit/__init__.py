"""slimkit: make trained PyTorch models smaller and faster, and prove it with measurements.

Importing slimkit imports every built-in technique family, so each technique is registered
(``slimkit.core.registry``) before anything looks one up; no family imports a heavy optional
dependency (transformers, onnxruntime, optuna, ...) until it is used.
"""

from __future__ import annotations

# The technique families: importing each registers its techniques and layer classes.
from slimkit import architecture, distill, factorize, nas, prune, quantize, train, zoo  # noqa: I001
from slimkit.core.config import BaseConfig, apply, registered_configs, technique
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import builder, layer_class
from slimkit.core.target import Measurement, Target
from slimkit.core.task import Task
from slimkit.core.versions import __version__
from slimkit.io import load, save
from slimkit.measure import Profile, profile
from slimkit.pipeline.recipe import Recipe
from slimkit.search import optimize

__all__ = [
    "BaseConfig", "Measurement", "Profile", "Recipe", "SlimkitError", "Target", "Task", "__version__", "apply",
    "architecture", "builder", "distill", "factorize", "layer_class", "load", "nas", "optimize", "profile", "prune",
    "quantize", "registered_configs", "save", "technique", "train", "zoo",
]
