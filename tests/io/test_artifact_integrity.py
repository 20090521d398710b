"""Corrupt, edited or hostile artifacts: each is refused with one line, before anything big is allocated.

Every load of a damaged artifact runs in a forked child whose address space may grow by at most
1 GiB (RLIMIT_AS), so a load that would allocate gigabytes for a claimed shape fails the test
with a raw allocation error instead of passing by luck.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import slimkit as sk
from slimkit import io
from slimkit.core.atomic import atomic_write
from slimkit.io import artifact_check as check
from slimkit.io.artifact import SPARSE_KEY, _header_metadata
from slimkit.zoo.digits import build_model

HEADROOM = 2**30  # bytes a child's address space may grow by while loading


def _pruned_digits() -> nn.Module:
    """The digits CNN with its 256 -> 64 head 99% zero, so the artifact stores that weight as CSR."""
    torch.manual_seed(0)
    model = build_model().eval()
    with torch.no_grad():
        keep = torch.rand_like(model[12].weight) < 0.01
        model[12].weight.mul_(keep)
    return model


def _child_load(path: str, queue, uid: int | None = None) -> None:
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: run every op inline
    if uid is not None:  # load as another user
        os.setgid(uid)
        os.setuid(uid)
    vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + HEADROOM, vm + HEADROOM))
    try:
        sk.load(path)
        queue.put("loaded")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
        queue.put(f"{type(exc).__name__}: {exc}")


def _load_capped(path: Path, uid: int | None = None) -> str:
    """``sk.load(path)`` in a forked child with capped memory: "loaded" or "ErrorType: message"."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_child_load, args=(str(path), queue, uid))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    return queue.get()


def _meta(path: Path) -> dict:
    return json.loads((path / io.META).read_text())


def _write_meta(path: Path, meta: dict) -> None:
    (path / io.META).write_text(json.dumps(meta))


def _rewrite_weights(path: Path, edit: Callable[[dict], None], header: dict | None = None, *,
                     forge: bool = False) -> None:
    """Re-store the weights file with ``edit`` applied to its entries; ``forge`` also rewrites the
    sidecar's integrity record to match, as an attacker who knows the format would."""
    file = path / io.WEIGHTS
    stored = load_file(str(file))
    header = _header_metadata(file) if header is None else header
    edit(stored)
    save_file(stored, str(file), metadata=header or None)
    if forge:
        meta = _meta(path)
        stored_specs, header_meta = check.header_table(file)
        sparse = check.sparse_table(header_meta, file, SPARSE_KEY)
        table = check.logical_table(stored_specs, sparse, file)
        meta["integrity"] = {"weights_bytes": file.stat().st_size, "weights_sha256": check.file_sha256(file),
                             "tensors": {k: [d, list(s)] for k, (d, s) in table.items()}}
        if sparse:
            meta["sparse"] = sparse
        _write_meta(path, meta)


def _flip_data_byte(path: Path) -> None:
    file = path / io.WEIGHTS
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x10  # inside the last tensor's data, past the header
    file.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    file = path / io.WEIGHTS
    file.write_bytes(file.read_bytes()[:-100])


def _as_int64(stored: dict) -> None:
    stored["0.weight"] = stored["0.weight"].round().to(torch.int64)


def _scaled(stored: dict) -> None:
    stored["0.weight"] = stored["0.weight"] * 1e36


def _sparse_claims(shape: list[int], *, forge: bool, old: bool = False) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        table = json.loads(_header_metadata(path / io.WEIGHTS)[SPARSE_KEY])
        table["12.weight"]["shape"] = shape
        _rewrite_weights(path, lambda s: None, {SPARSE_KEY: json.dumps(table)}, forge=forge)
        if old:  # as main wrote it: no integrity record, the same table in the sidecar
            meta = _meta(path)
            meta.pop("integrity")
            meta["sparse"] = table
            _write_meta(path, meta)
    return corrupt


def _builder_kwargs(**kwargs) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        meta = _meta(path)
        meta["builder"]["kwargs"] = kwargs
        _write_meta(path, meta)
    return corrupt


def _meta_key(key: str, value) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        meta = _meta(path)
        meta[key] = value
        _write_meta(path, meta)
    return corrupt


def _extra_tensor(path: Path) -> None:
    _rewrite_weights(path, lambda s: s.__setitem__("evil", torch.zeros(3)), forge=True)


def _nested_json(path: Path) -> None:
    (path / io.META).write_text("[" * 100_000 + "]" * 100_000)


HUGE = [1, 10**10]  # a CSR of one row claiming 40 GB of float32 columns
#: (id, how the artifact is damaged, the one-line error expected)
CORRUPTIONS = [
    ("flipped-byte", _flip_data_byte, r"model.safetensors is corrupt or was edited \(its SHA-256 differs"),
    ("int64", lambda p: _rewrite_weights(p, _as_int64), r"0.weight is stored as int64\[16, 1, 3, 3\] in model"
                                                         r".safetensors, slimkit.json records float32"),
    ("int64-forged", lambda p: _rewrite_weights(p, _as_int64, forge=True),
     r"0.weight is stored as int64, the model holds float32"),
    ("scaled-1e36", lambda p: _rewrite_weights(p, _scaled), r"corrupt or was edited \(its SHA-256 differs"),
    ("truncated", _truncate, r"model.safetensors is corrupt or truncated"),
    ("sparse-huge-shape", _sparse_claims(HUGE, forge=False), r"sparse tables of model.safetensors and slimkit.json"),
    ("sparse-huge-shape-forged", _sparse_claims(HUGE, forge=True), r"its tensors would take 38,147 MiB, more than"),
    ("sparse-huge-shape-old-artifact", _sparse_claims(HUGE, forge=False, old=True),
     r"its tensors would take 38,147 MiB"),
    ("sparse-wrong-shape-forged", _sparse_claims([64, 512], forge=True),
     r"12.weight has shape \(64, 512\), model expects \(64, 256\)"),
    ("builder-width-str", _builder_kwargs(width="16", classes=10),
     r"builder 'digits_cnn' rejects its arguments \(TypeError"),
    ("builder-width-negative", _builder_kwargs(width=-3, classes=10),
     r"builder 'digits_cnn' rejects its arguments \(RuntimeError"),
    ("builder-width-huge", _builder_kwargs(width=10**6, classes=10),
     r"the model its builder arguments describe \(digits_cnn\) would take [\d,]+ MiB"),
    ("builder-classes-2e63", _builder_kwargs(width=16, classes=2**63),
     r"builder 'digits_cnn' argument 9223372036854775808 exceeds every size the artifact's weights hold"),
    ("builder-width-smaller", _builder_kwargs(width=8, classes=10), r"0\.\w+ has shape \(16,.*model expects \(8,"),
    ("builder-unknown-argument", _builder_kwargs(depth=2), r"rejects its arguments \(TypeError: .*depth"),
    ("builder-kwargs-list", _meta_key("builder", {"name": "digits_cnn", "kwargs": [16]}),
     r"builder arguments must be a mapping, got list"),
    ("modules-wrong-type", _meta_key("modules", []), r"'modules' must be a dict, got list"),
    ("unknown-sidecar-key", _meta_key("evil", 1), r"slimkit.json: unknown key 'evil'"),
    ("unknown-tensor-forged", _extra_tensor, r"does not fit the model: unexpected 1 e.g. evil"),
    ("nested-json", _nested_json, r"slimkit.json is corrupt \(nested too deeply\)"),
    ("missing-weights", lambda p: (p / io.WEIGHTS).unlink(), r"no weights file at .*model.safetensors"),
    ("missing-sidecar", lambda p: (p / io.META).unlink(), r"is not a slimkit artifact \(no slimkit.json\)"),
]


@pytest.mark.parametrize(("corrupt", "message"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_a_damaged_artifact_is_one_line_error_without_big_allocation(tmp_path, corrupt, message):
    path = sk.save(_pruned_digits(), tmp_path / "m")
    assert "12.weight" in io.read_meta(path)["sparse"]  # the head is stored as CSR
    assert _load_capped(path) == "loaded"  # the cap leaves room for an honest load
    corrupt(path)
    got = _load_capped(path)
    assert got.startswith("SlimkitError: "), got
    assert "\n" not in got
    assert re.search(message, got), got


def test_a_huge_layer_spec_is_refused_before_it_is_built(tmp_path):
    torch.manual_seed(0)
    path = sk.save(sk.apply(build_model().eval(), sk.quantize.Int8()), tmp_path / "q")
    meta = _meta(path)
    meta["modules"]["12"]["spec"]["in_features"] = 10**7
    _write_meta(path, meta)
    got = _load_capped(path)
    assert got.startswith("SlimkitError: "), got
    assert re.search(r"12\.\w+ has shape \(64, 256\), model expects \(64, 10000000\)", got), got


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                               (0o077, 0o600, 0o700)])
def test_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        path = sk.save(nn.Linear(2, 2), tmp_path / "m")
        atomic_write(tmp_path / "r.json", lambda f: f.write(b"{}"))
    finally:
        os.umask(old)
    version = path.parent / os.readlink(path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [version / io.WEIGHTS, version / io.META,
                                                               tmp_path / ".m.lock", tmp_path / "r.json"]}
    assert modes == dict.fromkeys([io.WEIGHTS, io.META, ".m.lock", "r.json"], file_mode)
    assert stat.S_IMODE(version.stat().st_mode) == dir_mode


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="loading as another user needs root")
@pytest.mark.parametrize(("umask", "result"), [(0o022, "loaded"), (0o077, r"SlimkitError: cannot read .*slimkit.json "
                                                                            r"\(permission denied\)")])
def test_another_user_loads_what_was_saved_under_umask_022(umask, result):
    shared = Path(tempfile.mkdtemp())
    try:
        shared.chmod(0o755)  # a directory everyone may enter, as a shared models folder is
        old = os.umask(umask)
        try:
            path = sk.save(build_model().eval(), shared / "m")
        finally:
            os.umask(old)
        assert re.fullmatch(result + ".*", _load_capped(path, uid=65534))  # nobody
    finally:
        shutil.rmtree(shared)


def _as_main_wrote_it(path: Path, plain: Path) -> Path:
    """A plain artifact directory without integrity records, as slimkit wrote before them."""
    shutil.copytree(path, plain)
    meta = _meta(plain)
    meta.pop("integrity")
    _write_meta(plain, meta)
    return plain


@pytest.mark.parametrize("config", [sk.quantize.Float16(), sk.quantize.BFloat16(),
                                    sk.quantize.Float16(keep_norms_fp32=True)], ids=["fp16", "bf16", "fp16-norms32"])
def test_half_precision_reloads_bit_identical_with_the_same_dtypes(tmp_path, config):
    torch.manual_seed(0)
    half = sk.apply(build_model().eval(), config)
    x = torch.randn(6, 1, 8, 8)
    path = sk.save(half, tmp_path / "m")
    for where in (path, _as_main_wrote_it(path, tmp_path / "old")):
        back = sk.load(where)
        assert {k: v.dtype for k, v in back.state_dict().items()} == {k: v.dtype for k, v in half.state_dict().items()}
        assert torch.equal(back(x), half(x))
        assert back(x).dtype == torch.float32  # callers still get float32 out


def test_artifacts_saved_as_plain_directories_load_and_are_replaced(tmp_path, monkeypatch):
    model = _pruned_digits()
    x = torch.randn(3, 1, 8, 8)
    plain = _as_main_wrote_it(sk.save(model, tmp_path / "new"), tmp_path / "old")
    assert plain.is_dir() and not plain.is_symlink()
    assert torch.equal(sk.load(plain)(x), model(x))
    other = build_model(width=8).eval()
    sk.save(other, plain)  # exchanged for the versioned layout in one step
    assert plain.is_symlink() and torch.equal(sk.load(plain)(x), other(x))
    again = _as_main_wrote_it(tmp_path / "new", tmp_path / "again")
    from slimkit.io import artifact_store

    monkeypatch.setattr(artifact_store, "exchange", lambda a, b: False)  # an OS without renameat2
    sk.save(other, again)
    assert again.is_symlink() and torch.equal(sk.load(again)(x), other(x))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".again.")) == \
        [".again.lock", os.readlink(again)]


def test_without_symbolic_links_the_version_directory_takes_the_path(tmp_path, monkeypatch):
    from slimkit.io import artifact_store

    def no_links(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(artifact_store.os, "symlink", no_links)
    x = torch.randn(2, 1, 8, 8)
    for width in (16, 8):
        model = build_model(width=width).eval()
        path = sk.save(model, tmp_path / "m")
        assert path.is_dir() and not path.is_symlink()
        assert torch.equal(sk.load(path)(x), model(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", "m"]


def test_saving_over_a_users_own_symlink_leaves_its_target_alone(tmp_path):
    elsewhere = sk.save(nn.Linear(2, 2), tmp_path / "shared" / "best")
    target = elsewhere.parent / os.readlink(elsewhere)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best").symlink_to(target)  # a link the user made, to a directory elsewhere
    sk.save(nn.Linear(2, 3), tmp_path / "run" / "best")
    assert io.load_state(tmp_path / "run" / "best")["weight"].shape == (3, 2)
    assert io.load_state(elsewhere)["weight"].shape == (2, 2)  # the linked directory was not deleted


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ([1, 10**10], "float32", r"shape \(1, 10000000000\) where the model holds \(64, 256\)"),
    (["64", 256], "float32", "unreadable description"),
    ([-64, 256], "float32", "unreadable description"),
    ([1] * 9, "float32", "unreadable description"),
    ([64, 256], "load", "unreadable description"),
])
def test_sparse_descriptions_are_bounded_by_the_models_shapes(shape, dtype, message):
    from slimkit.formats.sparse import pack_state, unpack_state

    weight = torch.zeros(64, 256)
    weight[0, :3] = 1.0
    stored, encoded = pack_state({"w": weight})
    assert encoded["w"]["format"] == "csr"
    encoded["w"].update(shape=shape, dtype=dtype)
    with pytest.raises(sk.SlimkitError, match=message) as info:
        unpack_state(stored, encoded, shapes={"w": (64, 256)})
    assert "\n" not in str(info.value)
    with pytest.raises(sk.SlimkitError, match="sparse tensor w is not in the model"):
        unpack_state(stored, encoded, shapes={})
