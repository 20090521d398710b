"""Small fine-tuning loop shared by the zoo and by recovery after compression."""

from slimkit.train.loop import FitResult, fit

__all__ = ["FitResult", "fit"]
