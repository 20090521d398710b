"""Small deterministic training loops: ``fit`` trains the zoo's models from scratch, ``finetune``
recovers quality after compression (checkpoints, resume, early stopping) and is reused by every
technique that trains."""

from slimkit.train.checkpoint import load_checkpoint, save_checkpoint
from slimkit.train.finetune import TrainResult, WarmupCosine, checkpointing, finetune
from slimkit.train.loop import FitResult, fit
from slimkit.train.recover import Finetune

__all__ = ["Finetune", "FitResult", "TrainResult", "WarmupCosine", "checkpointing", "finetune", "fit", "load_checkpoint", "save_checkpoint"]
