"""Editing a model by name: pick layers with ``targets`` / ``exclude`` (the PEFT habit), swap a submodule."""

from __future__ import annotations

import re

import torch.nn as nn

from slimkit.core.errors import SlimkitError

SUPPORTED = (nn.Linear, nn.Conv2d)


def select(model: nn.Module, targets: str | tuple[str, ...], exclude: str | tuple[str, ...] = (),
           kinds: tuple[type[nn.Module], ...] = SUPPORTED) -> list[str]:
    """Names of the modules of ``kinds`` that ``targets`` picks and ``exclude`` does not."""
    named = {name: m for name, m in model.named_modules() if name}
    chosen = _match(named, targets, kinds, "targets")
    dropped = set(_match(named, exclude, (nn.Module,), "exclude")) if exclude else set()
    return [n for n in chosen if n not in dropped]


def _match(named: dict[str, nn.Module], spec: str | tuple[str, ...], kinds: tuple[type[nn.Module], ...],
           what: str) -> list[str]:
    if spec == "all":
        return [n for n, m in named.items() if isinstance(m, SUPPORTED) and isinstance(m, kinds)]
    if spec == "all-linear":
        return [n for n, m in named.items() if isinstance(m, nn.Linear) and isinstance(m, kinds)]
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise SlimkitError(f"{what} regex {spec!r} is invalid ({exc})", "fix the regular expression") from None
        return [n for n, m in named.items() if pattern.fullmatch(n) and isinstance(m, kinds)]
    missing = [n for n in spec if n not in named]
    if missing:
        raise SlimkitError(f"{what} names unknown module(s) {', '.join(missing[:3])}",
                           "use names from model.named_modules(), a regex, 'all' or 'all-linear'")
    return [n for n in spec if isinstance(named[n], kinds)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """``model.<name> = module`` for a dotted name (``encoder.layer.0.query``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if not hasattr(parent, child):
        raise AttributeError(f"no submodule {name}")
    setattr(parent, child, module)


#: Modules that read their children's weights directly instead of calling them.
WEIGHT_READERS = (nn.MultiheadAttention,)


def read_directly(model: nn.Module) -> dict[str, str]:
    """Submodules whose parent reads their weight tensors directly (``nn.MultiheadAttention``'s
    ``out_proj``): replacing them with another module type breaks the parent -> why."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_READERS):
            for child, _ in module.named_children():
                found[f"{name}.{child}" if name else child] = (f"inside {type(module).__name__}, which reads this "
                                                                "weight directly: kept as it is")
    return found

