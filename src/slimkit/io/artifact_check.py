"""What an artifact may claim before ``slimkit.load`` believes it.

Everything in ``slimkit.json`` and in the safetensors header is read as untrusted input: its
types and keys are checked, the tensors it describes are compared with the weights file (dtype,
shape, byte count, SHA-256) and with the model that will receive them, and the bytes a load
would allocate are bounded *before* anything is allocated. Each failure is one
:class:`SlimkitError` line naming the file and the tensor or key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from slimkit.core.errors import SlimkitError
from slimkit.formats.sparse import FORMATS, MAX_DIMS, SEP, check_sparse_parts

#: A tensor as the artifact describes it: (torch dtype name, shape).
Spec = tuple[str, tuple[int, ...]]

#: A sidecar larger than this is not one slimkit wrote (recipes and specs are a few kB).
MAX_META_BYTES = 16 * 2**20
#: A load may allocate at most this many times the weights file's bytes (sparse tensors expand:
#: a 99.9%-zero layer stored as CSR is ~100x smaller than dense) ...
MAX_EXPANSION = 1024
#: ... or this much, whichever is larger (small artifacts of models with big all-zero buffers).
MIN_BUDGET_BYTES = 64 * 2**20
FORMAT_VERSION = 1
KNOWN_KEYS = frozenset({"format", "builder", "recipe", "modules", "steps", "extra", "versions", "sparse",
                        "structure", "integrity"})
#: safetensors dtype codes -> torch dtype names.
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
          "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64"}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_RESAVE = "re-save the model (the file was damaged or edited)"


def dtype_named(name: object) -> torch.dtype | None:
    """The torch dtype of a name from an artifact, or None (``getattr(torch, name)`` alone would
    also accept ``"nn"`` or ``"load"``)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    return dtype if isinstance(dtype, torch.dtype) else None


def spec_bytes(spec: Spec) -> int:
    return math.prod(spec[1]) * torch.empty((), dtype=dtype_named(spec[0])).element_size()


def spec_of(t: torch.Tensor) -> Spec:
    return str(t.dtype).removeprefix("torch."), tuple(t.shape)


def read_sidecar(fd: int, source: str) -> dict[str, Any]:
    """Parse and type-check ``slimkit.json`` from an open file (at most :data:`MAX_META_BYTES`)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(0)
        raw = f.read(MAX_META_BYTES + 1)
    if len(raw) > MAX_META_BYTES:
        raise SlimkitError(f"{source} is larger than {MAX_META_BYTES >> 20} MiB; slimkit never writes one that big",
                           _RESAVE)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        why = str(exc).splitlines()[0] if not isinstance(exc, RecursionError) else "nested too deeply"
        raise SlimkitError(f"{source} is corrupt ({why})", "re-save the model") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise SlimkitError(f"{source} has an unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}",
                           "re-save the model with this slimkit version")
    check_sidecar(meta, source)
    return meta


def check_sidecar(meta: Mapping[str, Any], source: str) -> None:
    """Every key of ``slimkit.json`` known and of the type slimkit writes."""

    def bad(what: str) -> SlimkitError:
        return SlimkitError(f"{source}: {what}", _RESAVE)

    unknown = sorted(set(meta) - KNOWN_KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}")
    builder = meta.get("builder")
    if builder is not None:
        if not isinstance(builder, dict) or set(builder) - {"name", "kwargs"} or not isinstance(builder.get("name"), str):
            raise bad("'builder' must be {\"name\": str, \"kwargs\": {...}}")
        if not isinstance(builder.get("kwargs", {}), dict):
            raise bad(f"builder arguments must be a mapping, got {type(builder.get('kwargs')).__name__}")
    for key, kind in (("recipe", list), ("steps", list), ("modules", dict), ("extra", dict), ("versions", dict),
                      ("sparse", dict), ("integrity", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise bad(f"'{key}' must be a {kind.__name__}, got {type(meta[key]).__name__}")
    for name, entry in (meta.get("modules") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str) or not isinstance(entry.get("spec"), dict):
            raise bad(f"module {name!r} must be {{\"class\": str, \"spec\": {{...}}}}")
    for step in meta.get("steps") or []:
        if not isinstance(step, dict) or not isinstance(step.get("technique"), str):
            raise bad("every entry of 'steps' must name its technique")
    if meta.get("structure", "resized") != "resized":
        raise bad(f"unknown structure {meta['structure']!r}")
    if "integrity" in meta:
        integrity = meta["integrity"]
        if (set(integrity) != {"weights_bytes", "weights_sha256", "tensors"} or not _count(integrity["weights_bytes"])
                or not isinstance(integrity["weights_sha256"], str) or not _HEX64.fullmatch(integrity["weights_sha256"])
                or not isinstance(integrity["tensors"], dict)):
            raise bad("'integrity' must hold weights_bytes, weights_sha256 (hex) and tensors")
        for name, spec in integrity["tensors"].items():
            parse_spec(spec, f"{source}: tensor {name}")


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def parse_spec(value: object, what: str) -> Spec:
    """``[dtype name, [dims...]]`` from JSON as a :data:`Spec`, every part checked."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and dtype_named(value[0]) is not None
    shape = value[1] if ok else None
    if not ok or not isinstance(shape, (list, tuple)) or len(shape) > MAX_DIMS or not all(_count(d) for d in shape):
        raise SlimkitError(f"{what} has an unreadable dtype/shape {value!r}", _RESAVE)
    return str(value[0]), tuple(shape)


def header_table(file: Path) -> tuple[dict[str, Spec], dict[str, str]]:
    """Dtype and shape of every stored entry plus the header metadata; reads the header only
    (safetensors checks that the offsets fit the file)."""
    if not os.access(file, os.R_OK):
        raise SlimkitError(f"cannot read {file} (permission denied)",
                           "ask its owner to make the artifact readable (chmod -R a+rX)")
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            header_meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SlimkitError(f"{file} is corrupt or truncated ({first})", "re-save or re-download the model") from None
    out = {}
    for key, (code, shape) in stored.items():
        if code not in DTYPES:
            raise SlimkitError(f"{file}: {key} has dtype {code}, which slimkit never writes", _RESAVE)
        out[key] = (DTYPES[code], shape)
    return out, header_meta


def sparse_table(header_meta: Mapping[str, str], file: Path, key: str) -> dict[str, dict[str, Any]]:
    """The header's table of sparsely stored tensors, each entry's format/dtype/shape checked."""
    raw = header_meta.get(key)
    try:
        table = json.loads(raw) if raw is not None else {}
    except (json.JSONDecodeError, RecursionError):
        table = None
    if not isinstance(table, dict):
        raise SlimkitError(f"{file}: the sparse tensor table is corrupt", "re-save the model")
    for name, info in table.items():
        if not isinstance(info, dict) or info.get("format") not in FORMATS or not _count(info.get("nnz", 0)):
            raise SlimkitError(f"{file}: sparse tensor {name} has an unreadable description", _RESAVE)
        spec = parse_spec([info.get("dtype"), info.get("shape")], f"{file}: sparse tensor {name}")
        if not dtype_named(spec[0]).is_floating_point:
            raise SlimkitError(f"{file}: sparse tensor {name} claims dtype {spec[0]}; only floats are stored sparsely",
                               _RESAVE)
    return table


def logical_table(stored: Mapping[str, Spec], sparse: Mapping[str, Mapping[str, Any]], file: Path) -> dict[str, Spec]:
    """The tensors the weights file decodes to (dense entries as stored, sparse ones as described)."""
    table: dict[str, Spec] = {}
    with_parts = set()
    for key, spec in stored.items():
        name, sep, _ = key.rpartition(SEP)
        if sep:
            with_parts.add(name)
        else:
            table[key] = spec
    check_sparse_parts(str(file), with_parts, table, sparse)
    for name, info in sparse.items():
        table[name] = (str(info["dtype"]), tuple(info["shape"]))
    return table


def check_integrity(meta: Mapping[str, Any], file: Path, table: Mapping[str, Spec], sparse: Mapping[str, Any],
                    source: str) -> None:
    """The weights file is the one ``slimkit.json`` was written with: same tensors, dtypes,
    shapes, byte count and SHA-256. Artifacts from before integrity records skip the last three."""
    if "sparse" in meta and meta["sparse"] != dict(sparse):
        raise SlimkitError(f"{source}: the sparse tables of {file.name} and slimkit.json differ", _RESAVE)
    integrity = meta.get("integrity")
    if integrity is None:
        return
    claimed = {name: parse_spec(spec, name) for name, spec in integrity["tensors"].items()}
    for name in sorted(set(claimed) | set(table)):
        if name not in table or name not in claimed:
            where = "slimkit.json" if name not in table else file.name
            raise SlimkitError(f"{source}: {file.name} and slimkit.json list different tensors "
                               f"({name} is only in {where})", _RESAVE)
        if claimed[name] != table[name]:
            (fd, fs), (cd, cs) = table[name], claimed[name]
            raise SlimkitError(f"{source}: {name} is stored as {fd}{list(fs)} in {file.name}, "
                               f"slimkit.json records {cd}{list(cs)}", _RESAVE)
    size = file.stat().st_size
    if size != integrity["weights_bytes"]:
        raise SlimkitError(f"{file} is corrupt or truncated ({size} bytes, slimkit.json records "
                           f"{integrity['weights_bytes']})", "re-save or re-download the model")
    if file_sha256(file) != integrity["weights_sha256"]:
        raise SlimkitError(f"{file} is corrupt or was edited (its SHA-256 differs from the one slimkit.json records)",
                           "re-save or re-download the model")


def file_sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def budget(file_bytes: int, own_bytes: int = 0) -> int:
    """Bytes a load may allocate for the tensors of a ``file_bytes`` weights file (plus the
    model the caller built themselves, whose size is their choice)."""
    return max(MAX_EXPANSION * file_bytes, MIN_BUDGET_BYTES) + own_bytes


def check_budget(what: str, nbytes: int, limit: int, source: str) -> None:
    if nbytes > limit:
        raise SlimkitError(f"{source}: {what} would take {nbytes / 2**20:,.0f} MiB, more than the "
                           f"{limit / 2**20:,.0f} MiB its weights file can honestly describe",
                           "pass model=YourModule() to sk.load if the model really is that large")


def table_of(state: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    return {k: spec_of(t) for k, t in state.items() if isinstance(t, torch.Tensor)}


def model_table(model: nn.Module) -> dict[str, Spec]:
    """Dtype and shape of every tensor in ``model.state_dict()`` (works on the meta device too)."""
    return table_of(model.state_dict())


def model_bytes(model: nn.Module) -> int:
    return sum(spec_bytes(s) for s in model_table(model).values())


def check_names(own: Iterable[str], stored: Iterable[str], source: str) -> None:
    """The model's tensor names and the stored ones are the same set (one line naming the first difference)."""
    own, stored = set(own), set(stored)
    missing, unexpected = sorted(own - stored), sorted(stored - own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} e.g. {unexpected[0]}")
        raise SlimkitError(f"{source} does not fit the model: {'; '.join(parts)}",
                           "load it into the architecture it was saved from")


def check_fits(own: Mapping[str, Spec], table: Mapping[str, Spec], source: str, *, prefix: str = "",
               dtypes: bool = True) -> None:
    """Names, shapes and dtypes of the artifact's tensors equal those of the model (or of the
    submodule at ``prefix``), so nothing is read, cast or allocated for a tensor that does not fit."""
    if prefix:
        table = {k: v for k, v in table.items() if k.startswith(prefix)}
    check_names(own, table, source)
    for name, (dtype, shape) in table.items():
        own_dtype, own_shape = own[name]
        if shape != own_shape:
            raise SlimkitError(f"{source}: {name} has shape {shape}, model expects {own_shape}",
                               "load it into the architecture it was saved from")
        if dtypes and dtype != own_dtype:
            raise SlimkitError(f"{source}: {name} is stored as {dtype}, the model holds {own_dtype}",
                               "load it into the architecture it was saved from, or re-save the model")
