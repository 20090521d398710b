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

from slimkit.config import BaseConfig, register, register_handler
from slimkit.errors import SlimkitError
from slimkit.io import set_submodule
from slimkit.quantize.configs import Targets, _check
from slimkit.quantize.extreme_modules import ExtremeConv2d, ExtremeLinear
from slimkit.quantize.modules import QuantConv2d, QuantLinear


@dataclasses.dataclass(frozen=True)
class _ExtremeConfig(BaseConfig):
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
        _check("loss", self.loss, ("auto", "task", "distill"))
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SlimkitError(f"{self.type_name} steps={self.steps!r} is invalid",
                               "use a positive number of steps, e.g. 500")
        if not self.lr > 0:
            raise SlimkitError(f"{self.type_name} lr={self.lr!r} is invalid", "use a positive learning rate")


@register("quantize.Binary")
@dataclasses.dataclass(frozen=True)
class Binary(_ExtremeConfig):
    """1-bit weights ``alpha * sign(w)`` per output channel (XNOR-Net weights; activations stay float)."""

    mode = "binary"


@register("quantize.Ternary")
@dataclasses.dataclass(frozen=True)
class Ternary(_ExtremeConfig):
    """2-bit weights in {-Wn, 0, +Wp} per output channel; ``threshold`` x mean|w| is the zero band."""

    threshold: float = 0.7
    mode = "ternary"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.threshold < 2.0:
            raise SlimkitError(f"Ternary threshold={self.threshold} is outside (0, 2)", "use about 0.7")


def _int8_weights(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Conv2d):
        return QuantConv2d.from_float(layer, activations="none")
    return QuantLinear.from_float(layer, bits=8, activations="none")


def quantize_extreme(model: nn.Module, config: _ExtremeConfig, task: Any, *, progress: bool = False) -> nn.Module:
    """Fold BN, binarize / ternarize the targets, fine-tune, store bit-packed; score on torch."""
    from slimkit.quantize.ptq import _targets
    from slimkit.quantize.qat import _loss_fn, fold_and_freeze
    from slimkit.train.finetune import finetune

    if task is None or not getattr(task, "train", None):
        raise SlimkitError(f"{config.type_name} needs a task with training data (1-2 bit weights must be trained)",
                           "pass a task with train batches")
    model, folded, teacher = fold_and_freeze(model, config, task)
    names, skipped = _targets(model, config.targets, config.exclude, allow_conv=True)
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
    loss, kind = _loss_fn(config, task, teacher)
    start = time.perf_counter()
    result = finetune(model, task, steps=config.steps, lr=config.lr, seed=config.seed, loss=loss,
                      progress=progress, label=f"{config.mode} {task.name}")
    for name in trained:
        set_submodule(model, name, model.get_submodule(name).convert())
    for name in kept:
        set_submodule(model, name, _int8_weights(model.get_submodule(name)))
    model.eval()
    info = {"config": config.to_dict(), "layers": trained, "int8_layers": kept, "skipped": skipped,
            "reverted": [], "embeddings": [],
            "extreme": {"mode": config.mode, "steps": result.steps, "loss": kind, "first_loss": result.losses[0],
                        "last_loss": result.losses[-1], "seconds": round(time.perf_counter() - start, 2),
                        "folded_bn": folded}}
    if config.evaluate:
        info["extreme"]["score"] = task.evaluate(model)["score"]
        info["extreme"]["backend"] = "torch (packed weights unpacked to float per call: no binary kernel on this CPU)"
    model.slimkit_quant = info
    return model


register_handler(Binary, quantize_extreme)
register_handler(Ternary, quantize_extreme)

__all__ = ["Binary", "Ternary", "quantize_extreme"]
