"""slimkit: make trained PyTorch models smaller and faster, and prove it with measurements."""

from __future__ import annotations

__version__ = "0.1.0"

from slimkit import architecture, distill, factorize, nas, quantize, zoo
from slimkit.config import BaseConfig, apply, register, register_handler, registered_configs
from slimkit.errors import SlimkitError
from slimkit.io import load, save
from slimkit.measure import Profile, profile
from slimkit.recipe import Recipe
from slimkit.search import optimize
from slimkit.target import Measurement, Target
from slimkit.task import Task

__all__ = [
    "BaseConfig", "Measurement", "Profile", "Recipe", "SlimkitError", "Target", "Task", "__version__", "apply", "architecture",
    "distill", "factorize", "load", "nas", "optimize", "profile", "quantize", "register", "register_handler", "registered_configs",
    "save", "zoo",
]
