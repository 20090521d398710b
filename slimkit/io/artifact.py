"""Safe model storage: safetensors for tensors, JSON for everything else. Nothing is unpickled.

An artifact is a directory::

    model.safetensors   every parameter and buffer (packed integer tensors included); mostly-zero
                        tensors stored as bitmask+values or CSR parts (``slimkit.formats.sparse``)
    slimkit.json        how to rebuild the module, the recipe applied, library versions

Writes are atomic: the directory is assembled under a temporary name beside the target and
renamed into place, so a crash never leaves a half-written artifact where a reader looks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import records_of
from slimkit.core.registry import build_registered, builder_of, layer_class_named
from slimkit.core.versions import versions
from slimkit.formats.sparse import pack_state, unpack_state
from slimkit.graph.resize import conform

WEIGHTS = "model.safetensors"
META = "slimkit.json"
FORMAT_VERSION = 1
#: Key in the safetensors header metadata that describes sparsely stored tensors.
SPARSE_KEY = "slimkit.sparse"

def special_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"class": registered name, "spec": spec}}`` for every registered-class module."""
    return {name: {"class": m.slimkit_module_class, "spec": m.spec()}
            for name, m in model.named_modules() if name and getattr(m, "slimkit_module_class", None)}


def restore_modules(model: nn.Module, modules: Mapping[str, Mapping[str, Any]], *, source: str = "artifact") -> None:
    """Replace the named submodules of ``model`` by empty instances of their registered classes."""
    for name, entry in modules.items():
        cls = layer_class_named(str(entry.get("class", "")))
        if cls is None:
            raise SlimkitError(f"{source} uses an unknown module class {entry.get('class')!r}",
                               "upgrade slimkit or import the package that defines it")
        try:
            set_submodule(model, name, cls.empty(entry["spec"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SlimkitError(f"{source}: cannot rebuild module {name!r} ({exc})",
                               "load it into the architecture it was saved from") from None


def save(model: nn.Module, path: str | os.PathLike[str], *, recipe: list[dict[str, Any]] | None = None,
         extra: Mapping[str, Any] | None = None, sparse: bool | None = None) -> Path:
    """Write ``model`` as an artifact directory at ``path`` (replacing one that is there).

    ``sparse=None`` stores a mostly-zero tensor (pruned weights) sparsely when that saves at
    least a quarter of its bytes; ``True`` whenever it saves anything; ``False`` never.
    """

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state, encoded = pack_state(_contiguous_state(model), sparse)
    builder = builder_of(model)
    meta = {
        "format": FORMAT_VERSION,
        "builder": None if builder is None else {"name": builder[0], "kwargs": builder[1]},
        "recipe": recipe or [],
        "modules": special_modules(model),
        "steps": [r.to_dict() for r in records_of(model)],
        "extra": dict(extra or {}),
        "versions": versions(),
    }
    if encoded:  # the weights file carries the same table, so it decodes on its own too
        meta["sparse"] = encoded
    if getattr(model, "slimkit_resized", False):  # channels were removed: widths differ from the builder's
        meta["structure"] = "resized"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={SPARSE_KEY: json.dumps(encoded)} if encoded else None)
        (tmp / META).write_text(json.dumps(meta, default=str))  # compact: its bytes count in the size
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors; clone so every entry stands alone.
    state = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        state[name] = t.detach().to("cpu").contiguous().clone()
    return state


def _replace_dir(tmp: Path, path: Path) -> None:
    if not path.exists():
        os.replace(tmp, path)
        return
    if not path.is_dir():
        raise SlimkitError(f"{path} exists and is not an artifact directory", "choose another output path")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def artifact_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the artifact takes on disk: the sum of its files' sizes."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise SlimkitError(f"{path} is not a slimkit artifact (no {META})", "save it with slimkit.save first")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimkitError(f"{meta_file} is corrupt ({exc})", "re-save the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise SlimkitError(f"{meta_file} has an unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}",
                           "re-save the model with this slimkit version")
    return meta


def load_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of an artifact directory or of a single ``.safetensors`` file."""

    path = Path(path)
    file = path / WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise SlimkitError(f"no weights file at {file}", "check the path")
    try:
        stored = load_file(str(file))
        table = _header_metadata(file).get(SPARSE_KEY)
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlimkitError(f"{file} is corrupt or truncated ({first})", "re-save or re-download the model") from None
    if table is None and not any("::" in k for k in stored):  # "::" = sparse_format.SEP
        return stored  # a plain dense file
    try:
        encoded = json.loads(table or "{}")
    except json.JSONDecodeError:
        encoded = None
    if not isinstance(encoded, dict):
        raise SlimkitError(f"{file}: the sparse tensor table is corrupt", "re-save the model")
    return unpack_state(stored, encoded, source=str(file))


def _header_metadata(file: Path) -> dict[str, str]:

    with safe_open(str(file), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the module of an artifact and load its tensors, checking every name and shape.

    Pass ``model`` to load into a module you built yourself; otherwise the artifact's
    registered builder makes one (builders are looked up by name, never imported from the file).
    """
    meta = read_meta(path)
    state = load_state(path)
    if model is None:
        builder = meta.get("builder")
        if not builder:
            raise SlimkitError(f"{path} does not say how to rebuild its model",
                               "pass model=YourModule() to slimkit.load")
        model = build_registered(builder.get("name"), builder.get("kwargs", {}), what=str(path))
    if meta.get("structure") == "resized":
        conform(model, state)
    restore_modules(model, meta.get("modules") or {}, source=str(path))  # quantized layers etc.
    load_into(model, state, source=str(path))
    return model.eval()


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state") -> None:
    """``load_state_dict`` with one-line errors for missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} e.g. {unexpected[0]}")
        raise SlimkitError(f"{source} does not fit the model: {'; '.join(parts)}",
                           "load it into the architecture it was saved from")
    for name, t in state.items():
        if tuple(own[name].shape) != tuple(t.shape):
            raise SlimkitError(f"{source}: {name} has shape {tuple(t.shape)}, model expects {tuple(own[name].shape)}",
                               "load it into the architecture it was saved from")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SlimkitError(f"{source}: {name} contains NaN or Inf values", "the model file is damaged; re-save it")
    model.load_state_dict(dict(state), strict=True)
