"""The one registry: techniques, the layer classes artifacts are rebuilt from, and named model builders.

A technique is declared once, on its config class (``@technique`` in ``slimkit.core.config``):
the class carries its handler (``apply``), its search knobs (``suggest`` / ``applies``), its CLI
presets and its report section. Recipes, the search, save/load, the CLI and the report all read
this module; nothing keeps a second list of technique packages. ``import slimkit`` imports every
built-in technique family, so everything built in is registered before any lookup.

Layer classes (``@layer_class``) are the module types that replace standard layers (quantized,
factorized, sparse ...); an artifact names them so ``slimkit.load`` rebuilds the same structure.
Builders (``@builder``) make a model from JSON-able keyword arguments; an artifact names its builder,
and loading a file can never import or call code named inside it: names resolve only to what was
registered here (or to a module slimkit itself registered lazily with :func:`lazy_builders`).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.target import Target
from slimkit.core.task import Task

if TYPE_CHECKING:
    from slimkit.core.config import BaseConfig

#: Stage order of a pipeline: NAS and pruning change the architecture, "recover" trains after a
#: change (fine-tuning or distillation), fusion folds BatchNorm before quantization sees the layers.
STAGES = ("nas", "prune", "factorize", "recover", "fuse", "quantize")
#: Stages after which recovery training makes sense.
CHANGES_WEIGHTS = ("nas", "prune", "factorize")


@dataclasses.dataclass
class SearchContext:
    """What a technique may look at while proposing its knobs for one trial."""

    task: Task
    target: Target
    baseline: Mapping[str, float]               # size_mb, latency_ms, score, params of the original
    #: layer name -> metric drop when only that layer is compressed (bigger = more sensitive).
    sensitivity: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: Whether recovery training is possible (the task has training data and a loss).
    trainable: bool = False
    #: At most this many techniques per pipeline (recovery training not counted); None = one per stage.
    max_techniques: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def most_sensitive(self, k: int, kinds: tuple[type, ...] = (nn.Linear, nn.Conv2d)) -> tuple[str, ...]:
        """The ``k`` layers whose compression alone costs the most metric (from the baseline's sensitivity)."""
        if k <= 0 or not self.sensitivity:
            return ()
        modules = dict(self.task.model.named_modules())
        names = [n for n, _ in sorted(self.sensitivity.items(), key=lambda kv: -kv[1])
                 if isinstance(modules.get(n), kinds)]
        return tuple(names[:k])

    def has_embeddings(self) -> bool:
        """Whether the model has embedding tables (in a small transformer, half of the bytes) that
        4-bit groups of 32 fit."""
        tables = [m for m in self.task.model.modules() if isinstance(m, nn.Embedding)]
        return bool(tables) and all(m.embedding_dim % 32 == 0 for m in tables)

    def has_calibration(self) -> bool:
        return bool(self.task.calib)


Handler = Callable[[nn.Module, "BaseConfig", Any], nn.Module]
Suggest = Callable[[Any, SearchContext], "BaseConfig | None"]


@dataclasses.dataclass(frozen=True)
class Technique:
    """Everything slimkit knows about one technique, read off its config class."""

    name: str                                   # recipe type, e.g. "quantize.Int8"
    config: type[BaseConfig]
    stage: str
    #: Prefix of its Optuna parameters when the search offers it ("int8"); None = not searched.
    search: str | None = None

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def summary(self) -> str:
        return (self.config.__doc__ or "").strip().split("\n")[0]

    def suggest(self, trial: Any, ctx: SearchContext) -> BaseConfig | None:
        return self.config.suggest(trial, ctx)

    def applies(self, ctx: SearchContext) -> bool:
        return bool(self.config.applies(ctx))

    def presets(self) -> dict[str, BaseConfig]:
        return dict(self.config.presets())


_TECHNIQUES: dict[str, Technique] = {}
_LAYER_CLASSES: dict[str, type[nn.Module]] = {}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_LAZY_BUILDERS: dict[str, str] = {}
#: The built-in technique families, imported by the first lookup (``import slimkit`` itself stays light,
#: so the command line can answer ``--help`` without torch); names of slimkit modules, never from a file.
BUILTIN_FAMILIES = ("slimkit.architecture", "slimkit.distill", "slimkit.factorize", "slimkit.nas", "slimkit.prune",
                    "slimkit.quantize", "slimkit.train", "slimkit.zoo")
_builtins_imported = False


def _import_builtins() -> None:
    """Register every built-in technique, layer class and builder before the first lookup answers."""
    global _builtins_imported
    if not _builtins_imported:
        _builtins_imported = True  # first: a family's own import may look things up (it sees what is there so far)
        for module in BUILTIN_FAMILIES:
            importlib.import_module(module)


def add_technique(tech: Technique) -> None:
    if tech.stage not in STAGES:
        raise ValueError(f"unknown stage {tech.stage!r}; stages are {STAGES}")
    known = _TECHNIQUES.get(tech.name)
    if known is not None and known.config is not tech.config:
        raise ValueError(f"config type {tech.name!r} is already registered")
    if tech.search is not None:
        clash = [t for t in _TECHNIQUES.values() if t.search == tech.search and t.name != tech.name]
        if clash:
            raise ValueError(f"search name {tech.search!r} is already taken by {clash[0].name}")
    _TECHNIQUES[tech.name] = tech


def remove_technique(name: str) -> None:
    """Forget a technique (a plugin being unloaded, a test's own technique); unknown names are ignored."""
    _TECHNIQUES.pop(name, None)


def technique_named(name: str) -> Technique:
    """The technique of a recipe type name; unknown names are a one-line error listing the known ones."""
    _import_builtins()
    if name not in _TECHNIQUES:
        raise SlimkitError(f"unknown technique type {name!r}",
                           f"use one of: {', '.join(sorted(_TECHNIQUES)) or '(none registered)'}")
    return _TECHNIQUES[name]


def technique_of(config_type: type) -> Technique:
    _import_builtins()
    for klass in config_type.__mro__:
        name = getattr(klass, "type_name", "")
        if name in _TECHNIQUES and _TECHNIQUES[name].config is klass:
            return _TECHNIQUES[name]
    raise SlimkitError(f"{config_type.__name__} is not a registered technique",
                       "decorate its config with @slimkit.technique(...)")


def all_techniques() -> list[Technique]:
    """Every registered technique, in stage order."""
    _import_builtins()
    return sorted(_TECHNIQUES.values(), key=lambda t: (STAGES.index(t.stage), t.name))


def searchable(names: list[str] | None = None) -> list[Technique]:
    """Techniques the search offers (all, or those whose search names are given), in stage order."""
    offered = {t.search: t for t in all_techniques() if t.search is not None}
    if names is None:
        return list(offered.values())
    unknown = sorted(set(names) - set(offered))
    if unknown:
        raise SlimkitError(f"unknown technique(s) {', '.join(unknown)}", f"use some of: {', '.join(sorted(offered))}")
    return sorted((offered[n] for n in names), key=lambda t: STAGES.index(t.stage))


def all_presets() -> dict[str, tuple[Technique, BaseConfig]]:
    """Every technique's presets by name (``"int8-dynamic"`` -> its technique and config)."""
    out: dict[str, tuple[Technique, BaseConfig]] = {}
    for tech in all_techniques():
        for name, config in tech.presets().items():
            if name in out:
                raise ValueError(f"preset {name!r} is declared by {out[name][0].name} and {tech.name}")
            out[name] = (tech, config)
    return out


# ---- layer classes ---------------------------------------------------------------------------

def layer_class(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register a module class with ``spec() -> dict`` and ``empty(spec) -> module`` for artifacts."""

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        _LAYER_CLASSES[name] = cls
        cls.slimkit_module_class = name
        return cls

    return decorate


def layer_class_named(name: str) -> type[nn.Module] | None:
    _import_builtins()
    return _LAYER_CLASSES.get(name)


# ---- model builders --------------------------------------------------------------------------

def builder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``fn(**kwargs) -> nn.Module`` so artifacts can name it as their builder."""

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[name] = fn
        return fn

    return decorate


def lazy_builders(modules: Mapping[str, str]) -> None:
    """Builder name -> slimkit module that registers it on import (task modules with heavy imports)."""
    _LAZY_BUILDERS.update(modules)


def builder_of(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The ``(builder name, kwargs)`` a model was made with, if it carries one."""
    spec = getattr(model, "slimkit_builder", None)
    return (spec[0], dict(spec[1])) if spec else None


def build_registered(name: str, kwargs: Mapping[str, Any], *, what: str = "artifact") -> nn.Module:
    """The module the builder registered as ``name`` makes from ``kwargs``.

    Builders that wrap another (early exits, encoder subnets) name their inner builder the same
    way, so every lookup goes through here.
    """
    _import_builtins()
    if name not in _BUILDERS and name in _LAZY_BUILDERS:
        importlib.import_module(_LAZY_BUILDERS[name])  # a slimkit module, never a name from the file
    if name not in _BUILDERS:
        raise SlimkitError(f"{what} names an unknown model builder {name!r}",
                           "register it with slimkit.builder (import its package) or pass model=")
    return _BUILDERS[name](**kwargs)
