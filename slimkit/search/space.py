"""The optimizer's search space: each technique declares its own knobs and the stage it runs in.

A technique registers ``suggest(trial, ctx) -> BaseConfig | None``: it reads what it needs from the
:class:`SearchContext` (the task, the target, the measured baseline, per-layer sensitivity) and asks
the Optuna trial for its knobs, each named ``"<technique>.<knob>"`` so spaces never collide. The
optimizer picks at most one technique per stage (or none) and applies the chosen configs in
:data:`STAGES` order — prune before quantize, as the seed chapter advises — so a pipeline is simply
the list of configs, which is also the recipe.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import Any, Callable, Mapping

from slimkit.config import BaseConfig
from slimkit.errors import SlimkitError

#: Stage order of a pipeline. "recover" is fine-tuning or distillation after the model changed.
STAGES = ("nas", "prune", "factorize", "recover", "quantize", "fuse")

#: Modules whose import registers techniques; those not present in this install are skipped.
TECHNIQUE_MODULES = (
    "slimkit.search.builtin",         # prune, fine-tune, PTQ
    "slimkit.factorize.space",        # SVD / Tucker / CP
    "slimkit.distill.space",          # distillation as the recovery step
    "slimkit.quantize.mixed_space",   # QAT, mixed precision, ternary
    "slimkit.nas.space",              # architecture search, fusion
    "slimkit.nas.encoder_space",      # transformer-encoder NAS (layers, heads, FFN width)
)


@dataclasses.dataclass
class SearchContext:
    """What a technique may look at while proposing its knobs for one trial."""

    task: Any                                   # slimkit.Task
    target: Any                                 # slimkit.Target
    baseline: Mapping[str, float]               # size_mb, latency_ms, score, params, macs of the original
    #: layer name -> metric drop when only that layer is compressed (bigger = more sensitive).
    sensitivity: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: Whether recovery training is possible (the task has training data and a loss).
    trainable: bool = False
    #: At most this many techniques per pipeline (recovery training not counted); None = one per stage.
    max_techniques: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


Suggest = Callable[[Any, SearchContext], "BaseConfig | None"]


@dataclasses.dataclass(frozen=True)
class Technique:
    name: str
    stage: str
    suggest: Suggest
    #: Whether the technique can run on this task at all (e.g. fine-tuning needs training data).
    applies: Callable[[SearchContext], bool] = lambda ctx: True


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(name: str, stage: str, suggest: Suggest,
                       applies: Callable[[SearchContext], bool] | None = None) -> Technique:
    """Offer a technique to the optimizer; ``name`` is also the prefix of its Optuna parameters."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    tech = Technique(name, stage, suggest, applies or (lambda ctx: True))
    _TECHNIQUES[name] = tech
    return tech


def techniques(names: list[str] | None = None) -> list[Technique]:
    """Registered techniques (all, or those named), in stage order."""
    for module in TECHNIQUE_MODULES:
        if _exists(module):
            importlib.import_module(module)
    if names is not None:
        unknown = sorted(set(names) - set(_TECHNIQUES))
        if unknown:
            raise SlimkitError(f"unknown technique(s) {', '.join(unknown)}",
                               f"use some of: {', '.join(sorted(_TECHNIQUES))}")
        chosen = [_TECHNIQUES[n] for n in names]
    else:
        chosen = list(_TECHNIQUES.values())
    return sorted(chosen, key=lambda t: STAGES.index(t.stage))


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False
