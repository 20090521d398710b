"""Technique configs: frozen dataclasses of plain values that round-trip through JSON/YAML.

A technique is a function of (model, config, task), declared in one place: its config class
carries the handler (``apply_to``), the search knobs (``suggest`` / ``applies``), CLI presets and
a report section, and ``@technique`` registers the class once in :mod:`slimkit.core.registry`.
Configs have a ``version`` so a recipe written today can be read (or refused clearly) by a later
slimkit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import torch.nn as nn

from slimkit.core import registry
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, records_of, set_records
from slimkit.core.registry import SearchContext, Technique
from slimkit.core.task import Task

C = TypeVar("C", bound="BaseConfig")


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Base of every technique config. Subclasses are frozen dataclasses of plain values."""

    version: ClassVar[int] = 1
    #: Name under which the config is stored in recipes, e.g. ``"quantize.Float16"``.
    type_name: ClassVar[str] = ""

    # ---- what a technique declares on its config (read by the registry) -------------------------

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        """The handler: the model with this technique applied (it may change ``model`` in place)."""
        raise SlimkitError(f"{type(self).__name__} has no handler", "define apply_to(model, task) on the config")

    @classmethod
    def suggest(cls: type[C], trial: Any, ctx: SearchContext) -> C | None:
        """Search knobs: a config drawn from the Optuna ``trial`` (names prefixed with the search name)."""
        return None

    @classmethod
    def applies(cls, ctx: SearchContext) -> bool:
        """Whether the search may offer this technique on ``ctx.task`` at all."""
        return True

    @classmethod
    def presets(cls) -> dict[str, BaseConfig]:
        """Named starting points the CLI offers, e.g. ``{"int8-dynamic": Int8()}``."""
        return {}

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        """Add what a reader wants to see about this step (tables, plots) to a report."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML-safe) with ``type`` and ``version`` first."""
        fields = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"type": self.type_name or type(self).__name__, "version": self.version, **fields}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Rebuild a config from :meth:`to_dict` output; on ``BaseConfig`` it dispatches by ``type``."""
        if not isinstance(data, dict):
            raise SlimkitError(f"config must be a mapping, got {type(data).__name__}",
                               "write it as 'type: NAME' plus its options")
        data = dict(data)
        name = data.pop("type", None)
        target: type[BaseConfig] = cls
        if cls is BaseConfig:
            if not isinstance(name, str):
                raise SlimkitError(f"config has no technique 'type' (got {name!r})", "write it as 'type: family.Name'")
            target = registry.technique_named(name).config
        elif name is not None and name != (cls.type_name or cls.__name__):
            raise SlimkitError(f"config type {name!r} does not match {cls.type_name or cls.__name__}",
                               "check the 'type' field")
        version = data.pop("version", target.version)
        if version != target.version:
            raise SlimkitError(f"{target.type_name} config version {version} is not supported "
                               f"(this slimkit reads version {target.version})",
                               "re-create the recipe with this slimkit version")
        known = {f.name: f for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise SlimkitError(f"{target.type_name}: unknown option(s) {', '.join(unknown)}",
                               f"valid options: {', '.join(known) or '(none)'}")
        try:
            return target(**{k: _revive(v, known[k].type) for k, v in data.items()})  # type: ignore[return-value]
        except (TypeError, ValueError) as exc:
            raise SlimkitError(f"invalid {target.type_name} config: {exc}", "fix the option values") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SlimkitError(f"config is not valid JSON ({exc.msg} at line {exc.lineno})",
                               "fix the JSON text") from None


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, BaseConfig):
        return value.to_dict()
    return value


def _revive(value: Any, annotation: Any) -> Any:
    # Lists become tuples again so that configs stay hashable and compare equal after a round trip.
    if isinstance(value, list):
        return tuple(_revive(v, None) for v in value)
    return value


def technique(type_name: str, *, stage: str, search: str | None = None) -> Callable[[type[C]], type[C]]:
    """Register a config class as a technique: ``@technique("quantize.Int8", stage="quantize", search="int8")``.

    ``type_name`` is how recipes name it (``family.Name``), ``stage`` where it runs in a pipeline
    (:data:`slimkit.core.registry.STAGES`), ``search`` the prefix of its knobs when the search
    offers it (leave None for techniques the search should not try).
    """

    def decorate(cls: type[C]) -> type[C]:
        if not (isinstance(cls, type) and issubclass(cls, BaseConfig)):
            raise TypeError("@technique decorates BaseConfig subclasses")
        if "." not in type_name:
            raise ValueError(f"technique name {type_name!r} must be 'family.Name'")
        cls.type_name = type_name
        registry.add_technique(Technique(type_name, cls, stage, search))
        return cls

    return decorate


def registered_configs() -> dict[str, type[BaseConfig]]:
    """Every registered config type by recipe name."""
    return {t.name: t.config for t in registry.all_techniques()}


def apply(model: nn.Module, config: BaseConfig | Iterable[BaseConfig], task: Task | None = None,
          *, inplace: bool = False) -> nn.Module:
    """Apply one config, or several in order, and return the resulting model.

    The caller's model is left untouched unless ``inplace=True``: techniques are free to
    mutate the module they are given, so we hand them a deep copy.
    """
    configs = [config] if isinstance(config, BaseConfig) else list(config)
    for c in configs:
        if not isinstance(c, BaseConfig):
            raise SlimkitError(f"apply() got {type(c).__name__}, not a technique config",
                               "pass configs such as slimkit.quantize.Float16()")
        registry.technique_of(type(c))  # unregistered configs fail before any work
    out = model if inplace else copy.deepcopy(model)
    for c in configs:
        earlier = records_of(out)
        result = c.apply_to(out, task)
        if result is not out and records_of(result)[:len(earlier)] != earlier:  # a new module: keep the history
            set_records(result, earlier + records_of(result))
        out = result
    return out
