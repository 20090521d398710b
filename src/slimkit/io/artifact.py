"""Safe model storage: safetensors for tensors, JSON for everything else. Nothing is unpickled.

An artifact is a directory::

    model.safetensors   every parameter and buffer (packed integer tensors included); mostly-zero
                        tensors stored as bitmask+values or CSR parts (``slimkit.formats.sparse``)
    slimkit.json        how to rebuild the module, the recipe applied, library versions, and the
                        dtype and shape of every tensor plus the weights file's size and SHA-256

Saves are atomic and take turns (``slimkit.io.artifact_store``); loads check every claim of the
artifact against the weights file and the model before allocating (``slimkit.io.artifact_check``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes

from slimkit.core.atomic import create_exclusive
from slimkit.core.errors import SlimkitError
from slimkit.core.record import records_of
from slimkit.core.registry import builder_of
from slimkit.core.versions import versions
from slimkit.formats.sparse import pack_state, unpack_state
from slimkit.graph.resize import conform
from slimkit.io import artifact_check as check
from slimkit.io.artifact_check import FORMAT_VERSION, Spec
from slimkit.io.artifact_rebuild import (build, first_line, meta_state, probe_model, probe_modules, replay_casts,
                                          restore_modules)
from slimkit.io.artifact_store import META, WEIGHTS, Snapshot, reading, replace_artifact, step
from slimkit.io.loaded_form import say_loaded_form

#: Key in the safetensors header metadata that describes sparsely stored tensors.
SPARSE_KEY = "slimkit.sparse"
__all__ = ["FORMAT_VERSION", "META", "SPARSE_KEY", "WEIGHTS", "artifact_bytes", "load", "load_into", "load_state",
           "read_meta", "restore_modules", "save", "special_modules"]


def special_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"class": registered name, "spec": spec}}`` for every registered-class module."""
    return {name: {"class": m.slimkit_module_class, "spec": m.spec()}
            for name, m in model.named_modules() if name and getattr(m, "slimkit_module_class", None)}


def save(model: nn.Module, path: str | os.PathLike[str], *, recipe: list[dict[str, Any]] | None = None,
         extra: Mapping[str, Any] | None = None, sparse: bool | None = None, durable: bool = True) -> Path:
    """Write ``model`` as an artifact at ``path`` (replacing one that is there).

    ``sparse=None`` stores a mostly-zero tensor (pruned weights) sparsely when that saves at
    least a quarter of its bytes; ``True`` whenever it saves anything; ``False`` never.
    ``durable=False`` skips the fsyncs (an artifact written only to be measured and deleted):
    a killed process still leaves the old or the new artifact, a power cut may not.
    """
    path = Path(path)
    logical = _contiguous_state(model)
    state, encoded = pack_state(logical, sparse)
    builder = builder_of(model)
    meta: dict[str, Any] = {
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

    def write(directory: Path) -> None:
        # safetensors' own save_file writes 0600 files whatever the umask: serialize, then write ourselves
        data = save_bytes(state, metadata={SPARSE_KEY: json.dumps(encoded)} if encoded else None)
        _write_new(directory / WEIGHTS, data)
        step("weights_written")
        meta["integrity"] = {"weights_bytes": len(data), "weights_sha256": hashlib.sha256(data).hexdigest(),
                             "tensors": {k: [d, list(s)] for k, (d, s) in check.table_of(logical).items()}}
        _write_new(directory / META, json.dumps(meta, default=str).encode())  # compact: its bytes count in the size
        step("sidecar_written")

    return replace_artifact(path, write, durable=durable)


def _write_new(file: Path, data: bytes) -> None:
    with os.fdopen(create_exclusive(file), "wb") as f:
        f.write(data)


def _contiguous_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors; clone so every entry stands alone.
    state = {}
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        state[name] = t.detach().to("cpu").contiguous().clone()
    return state


def artifact_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the artifact takes on disk: the sum of its files' sizes (of the current version)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    with reading(path) as snap:
        return sum(p.stat().st_size for p in snap.directory.rglob("*") if p.is_file())


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checked contents of an artifact's ``slimkit.json``."""
    with reading(Path(path)) as snap:
        return check.read_sidecar(snap.fd, str(snap.directory / META))


class _Weights:
    """The weights file of one artifact version: header read and checked, tensors not yet."""

    def __init__(self, file: Path, meta: Mapping[str, Any] | None, source: str) -> None:
        if not file.is_file():
            raise SlimkitError(f"no weights file at {file}", "check the path" if meta is None else "re-save the model")
        self.file, self.source = file, source
        stored, header_meta = check.header_table(file)
        self.sparse = check.sparse_table(header_meta, file, SPARSE_KEY)
        self.table: dict[str, Spec] = check.logical_table(stored, self.sparse, file)
        if meta is not None:
            check.check_integrity(meta, file, self.table, self.sparse, source)
        self.limit = check.budget(file.stat().st_size)

    def largest_dense_dim(self) -> int:
        """The largest size a tensor stored dense has (its bytes are in the file), or the tensor count."""
        return max([len(self.table)] + [d for k, (_, s) in self.table.items() if k not in self.sparse for d in s])

    def tensors(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Every tensor, sparse ones decoded; ``shapes`` (already compared with the table) bound the decoding."""
        try:
            with safe_open(str(self.file), framework="pt") as f:
                stored = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise SlimkitError(f"{self.file} is corrupt or truncated ({first_line(exc)})",
                               "re-save or re-download the model") from None
        if not self.sparse:
            return stored
        return unpack_state(stored, self.sparse, source=str(self.file), shapes=shapes)


def _header_metadata(file: Path) -> dict[str, str]:
    """The metadata of a safetensors file's header (the sparse table lives there)."""
    return check.header_table(Path(file))[1]


def load_state(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of an artifact directory or of a single ``.safetensors`` file."""
    path = Path(path)
    if path.is_file() or (not path.exists() and not path.is_symlink()):
        weights = _Weights(path, None, str(path))
        return _bounded_tensors(weights)
    return _consistently(path, lambda snap: _bounded_tensors(
        _Weights(snap.directory / WEIGHTS, check.read_sidecar(snap.fd, str(snap.directory / META)), str(path))))


T = TypeVar("T")


def _consistently(path: Path, read: Callable[[Snapshot], T]) -> T:
    """``read`` one version of the artifact, again if a plain directory at the path was swapped
    for a version meanwhile (its files were then read from two versions)."""
    for _ in range(10):
        with reading(path) as snap:
            try:
                result = read(snap)
            except SlimkitError:
                if snap.still_current():
                    raise
                continue
            if snap.still_current():
                return result
    raise SlimkitError(f"{path} kept changing while it was read", "retry when the saves to it have finished")


def _bounded_tensors(weights: _Weights) -> dict[str, torch.Tensor]:
    check.check_budget("its tensors", sum(check.spec_bytes(s) for s in weights.table.values()), weights.limit,
                       weights.source)
    return weights.tensors({k: s for k, (_, s) in weights.table.items()})


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the module of an artifact and load its tensors, checking every name, dtype and shape.

    Pass ``model`` to load into a module you built yourself; otherwise the artifact's
    registered builder makes one (builders are looked up by name, never imported from the file).
    Nothing is allocated for a tensor before its size is known to fit the model. A quantized model comes
    back on torch's kernels, or as its reference float form where torch has none; one logged line says
    which, and where the file measured on ONNX Runtime is (``slimkit.io.loaded_form``).
    """
    seen: dict[str, Any] = {}
    loaded = _consistently(Path(path), lambda snap: _load_version(snap, model, seen))
    say_loaded_form(loaded, path, seen)  # which form of a quantized model this is, and where the measured one is
    return loaded


def _load_version(snap: Snapshot, model: nn.Module | None, seen: dict[str, Any]) -> nn.Module:
    source = str(snap.path)
    meta = check.read_sidecar(snap.fd, str(snap.directory / META))
    seen.clear()
    seen.update(meta)
    weights = _Weights(snap.directory / WEIGHTS, meta, source)
    limit = weights.limit + (0 if model is None else check.model_bytes(model))
    check.check_budget("its tensors", sum(check.spec_bytes(s) for s in weights.table.values()), limit, source)
    if model is None:
        builder = meta.get("builder")
        if not builder:
            raise SlimkitError(f"{source} does not say how to rebuild its model",
                               "pass model=YourModule() to slimkit.load")
        probe_model(builder, meta, weights.table, limit, weights.largest_dense_dim(), source)  # before building
        model = build(builder, source)
    else:
        probe_modules(meta.get("modules") or {}, weights.table, limit, source)
    if meta.get("structure") == "resized":
        conform(model, meta_state(weights.table))
    restore_modules(model, meta.get("modules") or {}, source=source)  # quantized layers etc.
    replay_casts(model, meta.get("steps") or [], source)
    own = check.model_table(model)
    check.check_fits(own, weights.table, source)
    load_into(model, weights.tensors({k: s for k, (_, s) in own.items()}), source=source)
    return model.eval()


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state") -> None:
    """``load_state_dict`` with one-line errors for missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    check.check_names(own, state, source)
    for name, t in state.items():
        if tuple(own[name].shape) != tuple(t.shape):
            raise SlimkitError(f"{source}: {name} has shape {tuple(t.shape)}, model expects {tuple(own[name].shape)}",
                               "load it into the architecture it was saved from")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise SlimkitError(f"{source}: {name} contains NaN or Inf values", "the model file is damaged; re-save it")
    model.load_state_dict(dict(state), strict=True)
