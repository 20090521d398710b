"""Numerical precision techniques. Import a config and pass it to ``slimkit.apply``."""

from slimkit.quantize.cast import BFloat16, Float16

__all__ = ["BFloat16", "Float16"]
