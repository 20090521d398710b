"""The options every command shares to say what it works on: a built-in task, or the user's own model.

``--model`` takes a Hugging Face directory, a slimkit artifact or ``package.module:factory`` (with
``--weights``); the task is then built for it (``slimkit.zoo.model_task``): inputs from ``--data`` or
synthesized (``--input-shape``), agreement with the original as the metric unless the data has labels.
"""

from __future__ import annotations

from typing import Optional

import typer

from slimkit import zoo
from slimkit.core.errors import SlimkitError
from slimkit.core.task import Task

TASK = typer.Option(None, help="built-in task name or package.module:function (default: the command's own)")
MODEL = typer.Option(None, help="your model instead of a task: an HF directory, a slimkit artifact, or "
                     "package.module:factory")
WEIGHTS = typer.Option(None, help="--model factory: its weights (.safetensors, or a .pt state dict)")
DATA = typer.Option(None, help="--model: inputs (a folder of images or WAV files, a .txt of lines, .npz/.safetensors)")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="--model without --data: the input shape, e.g. 3x224x224")
METRIC = typer.Option("auto", help="--model: auto, agreement, cosine, sqnr or accuracy (needs labelled --data)")


def load_task(task: Optional[str], default: str, model: Optional[str] = None, weights: Optional[str] = None,
              data: Optional[str] = None, input_shape: Optional[str] = None, metric: str = "auto") -> tuple[Task, str]:
    """The task to work on and the spec a recipe or a study stores to rebuild it."""
    if model is None:
        extra = [name for name, v in (("--weights", weights), ("--data", data), ("--input-shape", input_shape)) if v]
        if extra or metric != "auto":
            raise SlimkitError(f"{', '.join(extra) or '--metric'} go(es) with --model", "add --model PATH, or drop it")
        spec = task or default
        return zoo.load(spec), spec
    if task is not None:
        raise SlimkitError("give --task or --model, not both", "--model builds a task for your model")
    spec = zoo.model_spec(model, weights=weights, data=data, input_shape=input_shape, metric=metric)
    return zoo.load(spec), spec
