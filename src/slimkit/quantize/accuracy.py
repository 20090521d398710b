"""Accuracy control: put the most sensitive quantized layers back in float until the drop holds.

NNCF's ``quantize_with_accuracy_control`` idea: rank layers by how much the metric recovers
when *only that layer* goes back to float (measured one at a time), then revert in that order,
re-measuring after each, until ``drop <= max_drop``. Ranking runs on the torch backend (same
integers, cheaper to rebuild); every acceptance check runs on the backend the model deploys to.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import last_record
from slimkit.core.task import Task
from slimkit.measure.sensitivity import scored_swaps
from slimkit.quantize.record import QuantRecord
from slimkit.runtime import build

log = logging.getLogger("slimkit.quantize")


def control(model: nn.Module, originals: dict[str, nn.Module], config: Any, task: Task | None) -> nn.Module:
    """Revert layers of ``model`` (in place) until the task metric drop is within ``config.max_drop``."""
    if task is None:
        raise SlimkitError("max_drop needs a task to measure the metric on", "pass the task to slimkit.apply")
    quantized = {name: model.get_submodule(name) for name in originals}

    def score(backend: str) -> float:
        return task.evaluate(build(model, backend, task.example))["score"]

    def swap(name: str, to_float: bool) -> None:
        set_submodule(model, name, originals[name] if to_float else quantized[name])

    for name in originals:
        swap(name, True)
    baseline = score("torch")
    for name in originals:
        swap(name, False)
    current = score(config.backend)
    history = [{"reverted": None, "score": current, "drop": task.drop(baseline, current)}]
    info = last_record(model, QuantRecord)
    info.baseline, info.history = baseline, history
    if task.drop(baseline, current) <= config.max_drop:
        return model
    quantized_score = score("torch")
    float_scores = scored_swaps(model, lambda: score("torch"), originals, label="accuracy control")
    gains = {name: task.drop(baseline, quantized_score) - task.drop(baseline, s) for name, s in float_scores.items()}
    info.sensitivity = dict(sorted(gains.items(), key=lambda kv: -kv[1]))
    for name in info.sensitivity:
        swap(name, True)
        info.reverted.append(name)
        info.layers.remove(name)
        current = score(config.backend)
        drop = task.drop(baseline, current)
        history.append({"reverted": name, "score": current, "drop": drop})
        log.info("accuracy control: reverted %s to float, drop now %.4f", name, drop)
        if drop <= config.max_drop:
            break
    return model
