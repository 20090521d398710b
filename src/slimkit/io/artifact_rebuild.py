"""Rebuilding an artifact's module: sizes tried on the meta device first, dtype casts replayed.

A builder's arguments and a layer's spec come from a file. Made on the ``meta`` device they
cost no memory, so a load learns the shapes of what it would build, and compares them with the
artifact's tensors, before building anything for real. Steps whose technique says
``replay_on_load`` (the half-precision casts: the module's dtypes and its input/output casts,
which a state dict cannot carry) run again on the rebuilt module, so an fp16 artifact reloads as
the same fp16 module with bit-identical outputs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.nn as nn

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import build_registered, layer_class_named, technique_named
from slimkit.graph.resize import conform
from slimkit.io import artifact_check as check
from slimkit.io.artifact_check import Spec

T = TypeVar("T")
_REBUILD = "load it into the architecture it was saved from"


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def on_meta(make: Callable[[], T]) -> T:
    """``make()`` with every tensor it creates on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return make()


def build(builder: Mapping[str, Any], source: str) -> nn.Module:
    """The module the artifact's registered builder makes; bad arguments are one-line errors."""
    try:
        return build_registered(builder["name"], builder.get("kwargs", {}), what=source)
    except SlimkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - arguments from a file: any failure is bad input
        if torch.get_default_device().type == "meta":
            raise  # maybe only the meta device's fault (a builder that runs a forward pass): the caller decides
        raise SlimkitError(f"{source}: builder {builder['name']!r} rejects its arguments "
                           f"({type(exc).__name__}: {first_line(exc)})", "re-save the model") from None


def empty_module(name: str, entry: Mapping[str, Any], source: str) -> nn.Module:
    """An empty instance of a special layer's registered class, made from its saved spec."""
    cls = layer_class_named(str(entry.get("class", "")))
    if cls is None:
        raise SlimkitError(f"{source} uses an unknown module class {entry.get('class')!r}",
                           "upgrade slimkit or import the package that defines it")
    try:
        return cls.empty(entry["spec"])
    except Exception as exc:  # noqa: BLE001 - a spec from a file: any failure is bad input
        if torch.get_default_device().type == "meta":
            raise  # maybe only the meta device's fault (no meta kernel): the caller bounds the layer another way
        raise SlimkitError(f"{source}: cannot rebuild module {name!r} ({type(exc).__name__}: {first_line(exc)})",
                           _REBUILD) from None


def set_submodule_checked(model: nn.Module, name: str, module: nn.Module, source: str) -> None:
    try:
        set_submodule(model, name, module)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise SlimkitError(f"{source}: cannot rebuild module {name!r} ({exc})", _REBUILD) from None


def restore_modules(model: nn.Module, modules: Mapping[str, Mapping[str, Any]], *, source: str = "artifact") -> None:
    """Replace the named submodules of ``model`` by empty instances of their registered classes."""
    for name, entry in modules.items():
        set_submodule_checked(model, name, empty_module(name, entry, source), source)


def probe_modules(modules: Mapping[str, Mapping[str, Any]], table: Mapping[str, Spec], limit: int,
                  source: str) -> dict[str, nn.Module | None]:
    """Each outermost special layer (with the special layers nested in it) made on the meta
    device, its tensor names and shapes compared with the artifact's. A class that cannot be made
    there (no meta kernels; None in the result) has the product of its spec's integers bounded by
    the byte budget instead: no layer holds more elements than all its sizes multiplied."""
    outer = [n for n in modules if not any(n.startswith(f"{o}.") for o in modules if o != n)]
    out: dict[str, nn.Module | None] = {}
    for name in outer:
        inner = [n for n in modules if n.startswith(f"{name}.")]

        def make(name: str = name, inner: list[str] = inner) -> nn.Module:
            probe = empty_module(name, modules[name], source)
            for sub in inner:
                set_submodule_checked(probe, sub[len(name) + 1:], empty_module(sub, modules[sub], source), source)
            return probe

        try:
            probe = on_meta(make)
            own = {f"{name}.{k}": v for k, v in check.model_table(probe).items()}
        except SlimkitError:
            raise
        except Exception:  # noqa: BLE001 - decided when really built; its sizes bounded first
            for sub in [name, *inner]:
                check.check_budget(f"layer {sub!r} (sizes {_ints(modules[sub].get('spec'))})",
                                   math.prod(_ints(modules[sub].get("spec"))), limit, source)
            out[name] = None
            continue
        check.check_fits(own, table, source, prefix=f"{name}.", dtypes=False)
        out[name] = probe
    return out


def _ints(value: object) -> list[int]:
    if type(value) is int:
        return [abs(value)]
    if isinstance(value, dict):
        value = list(value.values())
    return [i for v in value for i in _ints(v)] if isinstance(value, list) else []


def probe_model(builder: Mapping[str, Any], meta: Mapping[str, Any], table: Mapping[str, Spec], limit: int,
                size_bound: int, source: str) -> None:
    """Build the artifact's model on the meta device, give it the saved structure and compare it
    with the artifact's tensors: a load builds nothing for real that does not fit.

    A builder that cannot run on the meta device (one that runs a forward pass) is checked more
    loosely: none of its integer arguments may exceed ``size_bound``, the largest dimension of a
    tensor whose bytes the weights file really holds (or the number of tensors).
    """
    try:
        model = on_meta(lambda: build(builder, source))
    except SlimkitError:
        raise
    except Exception:  # noqa: BLE001 - decided by a real build; its integers bounded first
        too_big = [i for i in _ints(builder.get("kwargs")) if i > size_bound]
        if too_big:
            raise SlimkitError(f"{source}: builder {builder['name']!r} argument {too_big[0]} exceeds every size "
                               f"the artifact's weights hold (at most {size_bound})", "re-save the model") from None
        probe_modules(meta.get("modules") or {}, table, limit, source)
        return
    check.check_budget(f"the model its builder arguments describe ({builder['name']})", check.model_bytes(model),
                       limit, source)
    modules = probe_modules(meta.get("modules") or {}, table, limit, source)
    if meta.get("structure") == "resized":
        on_meta(lambda: conform(model, meta_state(table)))
    for name, probe in modules.items():
        if probe is not None:
            set_submodule_checked(model, name, probe, source)
    on_meta(lambda: replay_casts(model, meta.get("steps") or [], source))
    later = [f"{name}." for name, probe in modules.items() if probe is None]  # checked once really built

    def now(key: str) -> bool:
        return not any(key.startswith(prefix) for prefix in later)

    own = {k: v for k, v in check.model_table(model).items() if now(k)}
    check.check_fits(own, {k: v for k, v in table.items() if now(k)}, source)


def meta_state(table: Mapping[str, Spec]) -> dict[str, torch.Tensor]:
    """Stand-ins of the artifact's tensors with their shapes and dtypes and no data."""
    return {k: torch.empty(s, dtype=check.dtype_named(d), device="meta") for k, (d, s) in table.items()}


def replay_casts(model: nn.Module, steps: Sequence[Mapping[str, Any]], source: str) -> None:
    """Apply again, in their order, the recorded steps whose technique declares ``replay_on_load``."""
    for record in steps:
        try:
            technique = technique_named(str(record.get("technique")))
        except SlimkitError:
            continue  # records are history; a cast this install lacks shows as a dtype mismatch next
        if not getattr(technique.config, "replay_on_load", False):
            continue
        try:
            config = technique.config.from_dict(dict(record.get("config") or {}))
        except (SlimkitError, TypeError, ValueError, KeyError) as exc:
            raise SlimkitError(f"{source}: the recorded {technique.name} step has unreadable options ({exc})",
                               "re-save the model") from None
        config.apply_to(model, None)
