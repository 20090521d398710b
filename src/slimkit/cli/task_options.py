"""The options every command shares to say what it works on: a built-in task, or the user's own model.

``--model`` takes a Hugging Face directory, a slimkit artifact or ``package.module:factory`` (with
``--weights``); the task is then built for it (``slimkit.zoo.model_task``): inputs from ``--data`` or
synthesized (``--input-shape``), agreement with the original as the metric unless the data has labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from slimkit.core.errors import SlimkitError

if TYPE_CHECKING:
    from slimkit.core.task import Task

#: The task every command works on when neither --task nor --model is given: the smallest built-in
#: (scikit-learn's digits, no download), the same for every command.
DEFAULT_TASK = "digits"
TASK = typer.Option(None, help=f"built-in task name or package.module:function (default: {DEFAULT_TASK})")
MODEL = typer.Option(None, help="your model instead of a task: an HF directory, a slimkit artifact, or "
                     "package.module:factory")
WEIGHTS = typer.Option(None, help="--model factory: its weights (.safetensors, or a .pt state dict)")
DATA = typer.Option(None, help="--model: inputs (a folder of images or WAV files, a .txt of lines, .npz/.safetensors)")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="--model without --data: the input shape, e.g. 3x224x224")
METRIC = typer.Option("auto", help="--model: auto, agreement, cosine, sqnr or accuracy (needs labelled --data)")


def task_spec(task: Optional[str], default: Optional[str], model: Optional[str] = None, weights: Optional[str] = None,
              data: Optional[str] = None, input_shape: Optional[str] = None, metric: str = "auto") -> Optional[str]:
    """The spec the command line names (``default`` when it names none), checked without building anything."""
    from slimkit import zoo
    from slimkit.zoo.model_task import METRICS, parse_shape

    if model is None:
        extra = [name for name, v in (("--weights", weights), ("--data", data), ("--input-shape", input_shape)) if v]
        if extra or metric != "auto":
            raise SlimkitError(f"{', '.join(extra) or '--metric'} go(es) with --model", "add --model PATH, or drop it")
        return task or default
    if task is not None:
        raise SlimkitError("give --task or --model, not both", "--model builds a task for your model")
    if metric not in METRICS:
        raise SlimkitError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    parse_shape(input_shape)
    factory = ":" in model and not Path(model).exists()
    for option, path in (("--model", None if factory else model), ("--weights", weights), ("--data", data)):
        if path is not None and not Path(path).exists():
            if option == "--model":
                raise SlimkitError(f"no model at {path!r}", "give an HF directory, a slimkit artifact or "
                                   "package.module:factory")
            raise SlimkitError(f"{option} {path} does not exist", f"give {option} an existing path")
    return zoo.model_spec(model, weights=weights, data=data, input_shape=input_shape, metric=metric)


def load_task(task: Optional[str], default: str, model: Optional[str] = None, weights: Optional[str] = None,
              data: Optional[str] = None, input_shape: Optional[str] = None, metric: str = "auto") -> tuple[Task, str]:
    """The task to work on and the spec a recipe or a study stores to rebuild it."""
    from slimkit import zoo

    spec = task_spec(task, default, model, weights, data, input_shape, metric) or default
    if spec in zoo.BUILTINS:  # a built-in's first use trains or downloads: show it
        return zoo.load(spec, progress=True), spec
    return zoo.load(spec), spec
