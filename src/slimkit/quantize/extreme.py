"""Binary and ternary networks: ``quantize.Binary`` / ``quantize.Ternary`` configs and their handler.

The handler folds BatchNorm, turns the target layers into straight-through binary / ternary
layers (``extreme_modules``), trains them with ``slimkit.train.finetune`` and stores them
bit-packed (1 or 2 bits per weight + two float32 scales per output channel), so the saved
artifact really is ~32x / ~16x smaller for those layers. The first and last weight layers are kept
at int8 weight-only by default: they are small and the most damaged by 1-2 bits (XNOR-Net, TTQ).
No fast binary kernel runs on this CPU: the packed weights are unpacked to float at run time.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch.nn as nn

from slimkit.core.config import technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.quantize.extreme_modules import ExtremeConv2d, ExtremeLinear
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.options import Targets, TrainedQuantConfig, check_choice
from slimkit.quantize.ptq import target_layers
from slimkit.quantize.qat import fold_and_freeze, training_loss
from slimkit.quantize.record import TrainedQuantRecord, Training
from slimkit.train.finetune import finetune

#: Training lengths the search offers (``ctx.extra["ternary_steps"]`` overrides, sized to the model).
TERNARY_SEARCH_STEPS = (300, 600)


@dataclasses.dataclass(frozen=True)
class _ExtremeConfig(TrainedQuantConfig):
    steps: int = 500
    lr: float = 1e-3
    keep_first_last: bool = True
    targets: Targets = "all"
    exclude: Targets = ()
    fold_bn: bool = True
    loss: str = "auto"
    evaluate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("loss", self.loss, ("auto", "task", "distill"))
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SlimkitError(f"{self.type_name} steps={self.steps!r} is invalid",
                               "use a positive number of steps, e.g. 500")
        if not self.lr > 0:
            raise SlimkitError(f"{self.type_name} lr={self.lr!r} is invalid", "use a positive learning rate")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return quantize_extreme(model, self, task)




@technique("quantize.Binary", stage="quantize")
@dataclasses.dataclass(frozen=True)
class Binary(_ExtremeConfig):
    """1-bit weights ``alpha * sign(w)`` per output channel (XNOR-Net weights; activations stay float)."""

    mode = "binary"


@technique("quantize.Ternary", stage="quantize", search="ternary")
@dataclasses.dataclass(frozen=True)
class Ternary(_ExtremeConfig):
    """2-bit weights in {-Wn, 0, +Wp} per output channel; ``threshold`` x mean|w| is the zero band."""

    threshold: float = 0.7
    mode = "ternary"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.threshold < 2.0:
            raise SlimkitError(f"Ternary threshold={self.threshold} is outside (0, 2)", "use about 0.7")

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Ternary:
        steps = trial.suggest_categorical("ternary.steps", list(ctx.extra.get("ternary_steps", TERNARY_SEARCH_STEPS)))
        return cls(steps=int(steps))


def _int8_weights(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d.from_float(layer, activations="none")
    return QuantLinear.from_float(layer, bits=8, activations="none")


def quantize_extreme(model: nn.Module, config: _ExtremeConfig, task: Task | None, *, progress: bool = False) -> nn.Module:
    """Fold BN, binarize / ternarize the targets, fine-tune, store bit-packed; score on torch."""
    if task is None or not getattr(task, "train", None):
        raise SlimkitError(f"{config.type_name} needs a task with training data (1-2 bit weights must be trained)",
                           "pass a task with train batches")
    model, folded, teacher = fold_and_freeze(model, config, task)
    names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=True)
    order = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    edges = {order[0], order[-1]} if config.keep_first_last and len(order) > 2 else set()
    kept = [n for n in names if n in edges]
    trained = [n for n in names if n not in edges]
    if not trained:
        raise SlimkitError(f"{config.type_name}: no layer left to binarize after keeping the first and last",
                           "set keep_first_last=False or widen targets")
    for name in trained:
        layer = model.get_submodule(name)
        cls = ExtremeConv2d if isinstance(layer, nn.Conv2d) else ExtremeLinear
        set_submodule(model, name, cls.from_float(layer, config.mode, getattr(config, "threshold", 0.7)))
    loss, kind = training_loss(config, task, teacher)
    start = time.perf_counter()
    result = finetune(model, task, steps=config.steps, lr=config.lr, seed=config.seed, loss=loss,
                      progress=progress, label=f"{config.mode} {task.name}")
    for name in trained:
        set_submodule(model, name, model.get_submodule(name).convert())
    for name in kept:
        set_submodule(model, name, _int8_weights(model.get_submodule(name)))
    model.eval()
    training = Training(steps=result.steps, loss=kind, first_loss=result.losses[0], last_loss=result.losses[-1],
                        seconds=round(time.perf_counter() - start, 2), folded_bn=folded, mode=config.mode)
    if config.evaluate:
        training.score = task.evaluate(model)["score"]
        training.backend = "torch (packed weights unpacked to float per call: no binary kernel on this CPU)"
    add_record(model, TrainedQuantRecord(config.type_name, config.to_dict(), skipped, layers=trained,
                                         training=training, int8_layers=kept))
    return model

__all__ = ["Binary", "Ternary", "quantize_extreme"]
