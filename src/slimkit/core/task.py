"""A Task is what a model is optimized *for*: the model, its data and how quality is scored."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError

#: The positional inputs of one model call.
Inputs = tuple[Any, ...]
#: Anything that maps model inputs to outputs: an ``nn.Module`` or a built runtime.
Runnable = Callable[..., Any]
#: ``metric(runnable, eval_data)`` -> a score, or a mapping with a ``"score"`` key and details.
Metric = Callable[[Runnable, Any], "float | Mapping[str, float]"]


@dataclasses.dataclass
class Task:
    """Model + data + metric.

    ``example`` is a tuple of positional inputs (what ``model(*example)`` takes).
    ``calib`` is a sequence of such input tuples; ``train`` and ``eval`` are task-specific
    (for classification: ``(inputs, labels)`` batches) and are only ever read by ``metric``
    and by training code that knows the task. The metric takes a *runnable*, so the same
    metric scores an ``nn.Module`` and a model built on another runtime.
    """

    name: str
    model: nn.Module
    example: tuple[torch.Tensor, ...]
    metric: Metric
    eval: Any
    calib: Sequence[tuple[torch.Tensor, ...]] = ()
    train: Any = None
    higher_is_better: bool = True
    metric_name: str = "score"
    description: str = ""
    splits: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: Loss for fine-tuning, ``loss(outputs, labels)``; None when the task has no labels.
    loss: Callable[[Any, Any], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise SlimkitError(f"task {self.name!r}: model is {type(self.model).__name__}, not a torch nn.Module",
                               "pass the model object itself")
        if not isinstance(self.example, tuple):
            self.example = (self.example,)

    def evaluate(self, runnable: Runnable | None = None) -> dict[str, float]:
        """Score ``runnable`` (default: the task's model) on the eval data.

        Always returns a dict with ``"score"``; NaN scores are an error, not a number to compare.
        """
        run = self.model if runnable is None else runnable
        if isinstance(run, nn.Module):
            run.eval()
        with torch.inference_mode():
            raw = self.metric(run, self.eval)
        result = {"score": float(raw)} if not isinstance(raw, Mapping) else {k: float(v) for k, v in raw.items()}
        if "score" not in result:
            raise SlimkitError(f"task {self.name!r}: metric returned no 'score'", "return a float or {'score': ...}")
        if math.isnan(result["score"]):
            raise SlimkitError(f"task {self.name!r}: metric is NaN", "check the model for NaN weights or inputs")
        return result

    def drop(self, baseline: float, candidate: float) -> float:
        """How much worse ``candidate`` is than ``baseline`` in metric units (negative = better)."""
        return baseline - candidate if self.higher_is_better else candidate - baseline


def accuracy(run: Runnable, batches: Sequence[tuple[tuple[torch.Tensor, ...], torch.Tensor]]) -> float:
    """Top-1 accuracy over ``(inputs, labels)`` batches; shared by the classification tasks."""
    correct = total = 0
    for inputs, labels in batches:
        logits = torch.as_tensor(run(*inputs))  # (B, classes)
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
    if total == 0:
        raise SlimkitError("accuracy over an empty eval set", "give the task some eval batches")
    return correct / total


def describe_batch(item: Any) -> str:
    """A batch's structure with tensor shapes, for errors: ``(Tensor[32, 1, 28, 28], Tensor[32])``."""
    if isinstance(item, torch.Tensor):
        return f"Tensor[{', '.join(str(d) for d in item.shape)}]"
    if isinstance(item, (tuple, list)):
        inner = ", ".join(describe_batch(x) for x in item)
        return f"({inner},)" if isinstance(item, tuple) and len(item) == 1 else f"({inner})" if isinstance(item, tuple) \
            else f"[{inner}]"
    return type(item).__name__


def split_item(item: Any) -> tuple[Inputs, Any]:
    """``((x, ...), y)`` -> (inputs, labels); a bare input tuple or tensor -> (inputs, None)."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)):
        return tuple(item[0]), item[1]
    if isinstance(item, (tuple, list)):
        return tuple(item), None
    return (item,), None
