"""Quantization-aware training: fold BatchNorm, ``prepare`` -> fine-tune -> ``convert``.

``prepare`` swaps the target layers for fake-quantized ones (``qat_modules``), starting from the
PTQ calibration (activation ranges from ``calibrate.collect`` / ``compute_range``, weight scales
from max-abs or min/max); ``slimkit.train.finetune`` trains weights and, with ``learn_scale``,
the LSQ steps; ``convert`` writes the trained integers into the same ``QuantLinear`` /
``QuantConv2d`` the PTQ path produces, so ``slimkit.runtime.build`` runs the result on ONNX
Runtime or torch kernels and the accuracy recorded is the deployed runtime's, not fake-quant's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.calibrate.ranges import collect, compute_range
from slimkit.core.config import technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import add_record, last_record, replace_last
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.graph.batchnorm import fold_batchnorm
from slimkit.quantize.options import BACKENDS, CALIBRATIONS, Targets, TrainedQuantConfig, check_choice
from slimkit.quantize.ptq import MAX_ABS_RANGE, quantize_embeddings, target_layers
from slimkit.quantize.qat_modules import QATConv2d, QATLinear, qat_layers
from slimkit.quantize.record import TrainedQuantRecord, Training
from slimkit.runtime import backend_reason, build
from slimkit.train.finetune import finetune

log = logging.getLogger("slimkit.quantize")

LOSSES = ("auto", "task", "distill")

#: Training lengths the search offers (``ctx.extra["qat_steps"]`` overrides, sized to the model).
QAT_SEARCH_STEPS = (100, 300)


@technique("quantize.QAT", stage="quantize", search="qat")
@dataclasses.dataclass(frozen=True)
class QAT(TrainedQuantConfig):
    """Quantization-aware training to int8 (weights + static/dynamic activations) or int8/int4 weight-only.

    ``learn_scale``: LSQ steps (else the PTQ scales, re-derived from the weights every step).
    ``per_tensor`` (int4 weight-only): one symmetric step per weight tensor, convolutions included,
    stored as packed 4-bit ``BitLinear`` / ``BitConv2d``: the setting where int4 PTQ loses accuracy
    on small CNNs and LSQ earns its keep (``group_size`` is then unused).
    ``loss``: ``"task"`` (the task's loss on labels), ``"distill"`` (output MSE to the float model:
    for tasks without labels) or ``"auto"`` (task when it has labels and a loss, else distill).
    ``evaluate``: score the converted model on ``backend`` and record it in the step's record.
    ``recompute``: the repeated blocks recompute their activations in the backward pass (``train.recompute``).
    """

    bits: int = 8
    weight_only: bool = False
    activations: str = "static"
    calibration: str = "mse"
    symmetric: bool = True
    group_size: int = 32
    per_tensor: bool = False
    steps: int = 300
    lr: float = 5e-4
    learn_scale: bool = True
    loss: str = "auto"
    targets: Targets = "all"
    exclude: Targets = ()
    embeddings: bool = True
    fold_bn: bool = True
    backend: str = "auto"
    evaluate: bool = True
    seed: int = 0
    recompute: bool = False

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (8, 4))
        check_choice("activations", self.activations, ("static", "dynamic"))
        check_choice("calibration", self.calibration, CALIBRATIONS)
        check_choice("loss", self.loss, LOSSES)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("group_size", self.group_size, (0, 32, 64, 128, 256))
        if self.bits == 4 and not self.weight_only:
            raise SlimkitError("int4 QAT is weight-only (the int4 kernels take float activations)",
                               "set weight_only=True or bits=8")
        if self.per_tensor and not (self.bits == 4 and self.weight_only):
            raise SlimkitError("per_tensor steps are for int4 weight-only QAT",
                               "set bits=4, weight_only=True, or per_tensor=False")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise SlimkitError(f"QAT steps={self.steps!r} is invalid", "use a positive number of steps, e.g. 300")
        if not self.lr > 0:
            raise SlimkitError(f"QAT lr={self.lr!r} is invalid", "use a positive learning rate, e.g. 5e-4")

    @property
    def act_mode(self) -> str:
        return "none" if self.weight_only else self.activations

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return quantize_qat(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> QAT:
        bits = trial.suggest_categorical("qat.bits", [8, 4])
        steps = trial.suggest_categorical("qat.steps", list(ctx.extra.get("qat_steps", QAT_SEARCH_STEPS)))
        learn = trial.suggest_categorical("qat.learn_scale", [True, False])
        if bits == 4:
            group = trial.suggest_categorical("qat.group_size", [32, 64, 128])
            return cls(bits=4, weight_only=True, group_size=group, steps=int(steps), learn_scale=learn)
        return cls(bits=8, steps=int(steps), learn_scale=learn)




def prepare(model: nn.Module, config: QAT, task: Task) -> nn.Module:
    """Swap target layers (in place) for fake-quantized ones; embeddings become int8 tables as in PTQ."""
    allow_conv = config.bits == 8 or config.per_tensor
    names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=allow_conv)
    tables = quantize_embeddings(model, config, skipped)
    ranges: dict[str, tuple[float, float]] = {}
    if config.act_mode == "static":
        if not getattr(task, "calib", None):
            raise SlimkitError("QAT with static activations needs calibration data and the task has none",
                               "pass a task with calib batches, or activations='dynamic'")
        observers = collect(model, names, task.calib, which="input")
        for name in list(names):
            lo, hi = compute_range(observers[name], config.calibration, symmetric=config.symmetric, bits=8)
            if not (math.isfinite(lo) and math.isfinite(hi)) or max(abs(lo), abs(hi)) > MAX_ABS_RANGE:
                skipped[name] = f"input range [{lo:.3g}, {hi:.3g}] is not a real activation range (mask-like)"
                names.remove(name)
            else:
                ranges[name] = (lo, hi)
    for name in names:
        layer = model.get_submodule(name)
        common = {"activations": config.act_mode, "act_range": ranges.get(name), "symmetric": config.symmetric,
                  "learn": config.learn_scale, "per_tensor": config.per_tensor}
        if isinstance(layer, nn.Conv2d):
            set_submodule(model, name, QATConv2d.from_float(layer, **common))
            continue
        group = config.group_size if config.bits == 4 and not config.per_tensor else 0
        if group and layer.in_features % group:
            skipped[name] = f"in_features {layer.in_features} is not a multiple of group_size {group}"
            continue
        set_submodule(model, name, QATLinear.from_float(layer, bits=config.bits, group_size=group, **common))
    if not qat_layers(model):
        first = next(iter(skipped.items()), ("", "no layer matched the targets"))
        raise SlimkitError(f"QAT has no layer to train: every targeted layer was left out ({first[0]}: {first[1]})",
                           "use bits=8, another group_size, or widen targets")
    add_record(model, TrainedQuantRecord(config.type_name, config.to_dict(), skipped, layers=list(qat_layers(model)),
                                         embeddings=tables))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized layer (in place) by its integer module; returns the model in eval mode."""
    layers = qat_layers(model)
    if not layers:
        raise SlimkitError("convert: the model has no QAT layers", "call prepare() first")
    for name, layer in layers.items():
        set_submodule(model, name, layer.convert())
    return model.eval()


def ptq_start(model: nn.Module, config: QAT, task: Task) -> nn.Module:
    """The PTQ model QAT starts from: fold BN, prepare, convert with no training (same integers
    as ``config.steps=0`` would give). The honest baseline for what the training adds."""
    model, folded, _ = fold_and_freeze(copy.deepcopy(model), config, task)
    prepare(model, config, task)
    convert(model)
    record = last_record(model, TrainedQuantRecord)
    record.training = Training(steps=0, loss="none", first_loss=0.0, last_loss=0.0, seconds=0.0, folded_bn=folded)
    return model


def training_loss(config: QAT, task: Task, teacher: nn.Module) -> Any:
    has_labels = task.loss is not None and task.train and isinstance(task.train[0], (tuple, list)) \
        and len(task.train[0]) == 2 and isinstance(task.train[0][0], (tuple, list))
    kind = config.loss if config.loss != "auto" else ("task" if has_labels else "distill")
    if kind == "task":
        if not has_labels:
            raise SlimkitError(f"task {task.name!r} has no labelled training data for loss='task'",
                               "use loss='distill' (match the float model's outputs)")
        return None, kind

    def distill(model: nn.Module, inputs: tuple, labels: Any) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(*inputs)
        return F.mse_loss(model(*inputs), target) * (1.0 / max(1e-12, float(target.pow(2).mean())))

    return distill, kind


def fold_and_freeze(model: nn.Module, config: Any, task: Task) -> tuple[nn.Module, list[str], nn.Module]:
    """Fold BN into the convs before training (``config.fold_bn``) and keep a frozen copy of the
    folded float model as the distillation teacher. Returns (model, folded BN names, teacher)."""
    folded: list[str] = []
    if config.fold_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model, folded = fold_batchnorm(model, task.example)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return model, folded, teacher


def quantize_qat(model: nn.Module, config: QAT, task: Task | None, *, progress: bool = False) -> nn.Module:
    """The registered handler: fold BN, prepare, fine-tune ``config.steps`` steps, convert, score."""
    if task is None or not getattr(task, "train", None):
        raise SlimkitError("QAT needs a task with training data", "pass a task with train batches, or use PTQ")
    model, folded, teacher = fold_and_freeze(model, config, task)
    prepare(model, config, task)
    loss, kind = training_loss(config, task, teacher)
    start = time.perf_counter()
    result = finetune(model, task, steps=config.steps, lr=config.lr, seed=config.seed, loss=loss,
                      progress=progress, label=f"QAT {task.name}", recompute=config.recompute)
    convert(model)
    record = last_record(model, TrainedQuantRecord)
    record.training = Training(steps=result.steps, loss=kind, first_loss=result.losses[0], last_loss=result.losses[-1],
                               seconds=round(time.perf_counter() - start, 2), folded_bn=folded)
    if config.evaluate:
        run = build(model, config.backend, task.example)
        record.training.score = task.evaluate(run)["score"]
        record.training.backend = backend_reason(model, config.backend)
    replace_last(model, record)
    return model

__all__ = ["QAT", "convert", "prepare", "ptq_start", "quantize_qat"]
