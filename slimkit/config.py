"""Technique configs and the registry that maps each config type to its handler.

A technique is a function of (model, config, task). Configs are frozen dataclasses with a
``version`` so a recipe written today can be read (or refused clearly) by a later slimkit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import torch.nn as nn

from slimkit.errors import SlimkitError

Handler = Callable[[nn.Module, "BaseConfig", Any], nn.Module]
C = TypeVar("C", bound="BaseConfig")

_CONFIGS: dict[str, type["BaseConfig"]] = {}
_HANDLERS: dict[type["BaseConfig"], Handler] = {}


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Base of every technique config. Subclasses are frozen dataclasses of plain values."""

    version: ClassVar[int] = 1
    #: Name under which the config is stored in recipes, e.g. ``"quantize.Float16"``.
    type_name: ClassVar[str] = ""

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
            if name not in _CONFIGS:
                raise SlimkitError(f"unknown technique type {name!r}",
                                   f"use one of: {', '.join(sorted(_CONFIGS)) or '(none registered)'}")
            target = _CONFIGS[name]
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


def register(type_name: str) -> Callable[[type[C]], type[C]]:
    """Class decorator + handler registration in one: ``@register("quantize.Float16")`` on a config.

    Use as ``register_handler(Config, fn)`` when handler and config live apart.
    """

    def decorate(cls: type[C]) -> type[C]:
        if not (isinstance(cls, type) and issubclass(cls, BaseConfig)):
            raise TypeError("@register decorates BaseConfig subclasses")
        if type_name in _CONFIGS and _CONFIGS[type_name] is not cls:
            raise ValueError(f"config type {type_name!r} is already registered")
        cls.type_name = type_name
        _CONFIGS[type_name] = cls
        return cls

    return decorate


def register_handler(config_type: type[BaseConfig], handler: Handler) -> None:
    """Bind ``handler(model, config, task) -> model`` to a config type."""
    _HANDLERS[config_type] = handler


def registered_configs() -> dict[str, type[BaseConfig]]:
    """Every registered config type by recipe name (a copy)."""
    return dict(_CONFIGS)


def handler_for(config: BaseConfig) -> Handler:
    for klass in type(config).__mro__:
        if klass in _HANDLERS:
            return _HANDLERS[klass]
    raise SlimkitError(f"no handler is registered for {type(config).__name__}",
                       "import the module that defines the technique or register one")


def apply(model: nn.Module, config: BaseConfig | Iterable[BaseConfig], task: Any = None,
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
    out = model if inplace else copy.deepcopy(model)
    for c in configs:
        out = handler_for(c)(out, c, task)
    return out
