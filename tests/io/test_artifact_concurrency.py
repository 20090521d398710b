"""Saves that crash, saves that race each other, readers that race saves: the path always loads.

Crashes are injected at every step a save passes (``artifact_store.SAVE_STEPS``) through the
module's step hook: a forked child ends itself with ``os._exit`` there (no cleanup runs, as with
SIGKILL), or, in-process, the hook raises. Children run torch single-threaded: the parent's
OpenMP pool does not survive fork.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import slimkit as sk
from slimkit.io import artifact_store
from slimkit.io.artifact_store import SAVE_STEPS

KILLED = 77
LAYOUTS = ["versioned", "plain", "plain-no-exchange"]  # plain: a directory as slimkit wrote before versions


def _model(value: float) -> nn.Module:
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(value)
    return model


def _value(path: Path) -> float:
    """The value a loaded artifact was saved with; weight and bias from one save (never a mix)."""
    back = sk.load(path, model=nn.Linear(4, 4))
    value = back.weight.detach()[0, 0]
    assert bool((back.weight == value).all()) and bool((back.bias == value).all())
    return float(value)


def _start(tmp_path: Path, layout: str) -> Path:
    path = tmp_path / "m"
    if layout == "versioned":
        return sk.save(_model(1.0), path)
    src = sk.save(_model(1.0), tmp_path / "src" / "m")
    shutil.copytree(src, path)  # follows the link: a plain directory
    shutil.rmtree(tmp_path / "src")
    return path


def _save_and_die(path: str, at: str, no_exchange: bool) -> None:
    torch.set_num_threads(1)
    if no_exchange:
        artifact_store.exchange = lambda a, b: False
    artifact_store.step_hook = lambda step: os._exit(KILLED) if step == at else None
    sk.save(_model(2.0), path)
    os._exit(0)


class _Injected(RuntimeError):
    pass


def _save_and_raise(path: Path, at: str) -> bool:
    def hook(step: str) -> None:
        if step == at:
            raise _Injected(step)

    artifact_store.step_hook = hook
    try:
        sk.save(_model(2.0), path)
    except _Injected:
        return True
    finally:
        artifact_store.step_hook = None
    return False


@pytest.mark.parametrize("how", ["killed", "raised"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("at", SAVE_STEPS)
def test_a_save_stopped_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path, monkeypatch, at, layout, how):
    path = _start(tmp_path, layout)
    if how == "killed":
        child = mp.get_context("fork").Process(target=_save_and_die, args=(str(path), at, layout == "plain-no-exchange"))
        child.start()
        child.join(60)
        assert child.exitcode in (0, KILLED)
        stopped = child.exitcode == KILLED
    else:
        if layout == "plain-no-exchange":
            monkeypatch.setattr(artifact_store, "exchange", lambda a, b: False)
        stopped = _save_and_raise(path, at)
    assert stopped == (at != "moved_aside" or layout == "plain-no-exchange")  # the only step some saves skip
    new = not stopped or SAVE_STEPS.index(at) >= SAVE_STEPS.index("swapped")
    assert _value(path) == (2.0 if new else 1.0)
    sk.save(_model(3.0), path)  # cleans whatever the stopped save left
    assert _value(path) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", os.readlink(path), "m"]


def _writer(path: str, writer: int, saves: int, queue) -> None:
    torch.set_num_threads(1)
    failures = []
    for i in range(saves):
        try:
            sk.save(_model(100 * writer + i), path)
        except Exception as exc:  # noqa: BLE001 - counted, reported to the parent
            failures.append(f"{type(exc).__name__}: {exc}")
    queue.put(("writer", saves, failures))


def _reader(path: str, stop, queue) -> None:
    torch.set_num_threads(1)
    loads, failures, seen = 0, [], set()
    while not stop.is_set() or loads < 5:
        try:
            seen.add(_value(Path(path)))
            loads += 1
        except Exception as exc:  # noqa: BLE001 - counted, reported to the parent
            failures.append(f"{type(exc).__name__}: {exc}")
    queue.put(("reader", loads, failures, sorted(seen)))


@pytest.mark.parametrize("layout", ["versioned", "plain"])
def test_two_writers_and_a_reader_on_one_path_never_fail(tmp_path, layout):
    path = _start(tmp_path, layout)
    ctx = mp.get_context("fork")
    queue, stop = ctx.SimpleQueue(), ctx.Event()
    reader = ctx.Process(target=_reader, args=(str(path), stop, queue))
    writers = [ctx.Process(target=_writer, args=(str(path), w, 10, queue)) for w in (1, 2)]
    reader.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
    stop.set()
    reader.join(120)
    results = [queue.get() for _ in range(3)]
    assert [w.exitcode for w in writers] + [reader.exitcode] == [0, 0, 0]
    writes = [r for r in results if r[0] == "writer"]
    (_, loads, read_failures, seen), = [r for r in results if r[0] == "reader"]
    assert [(saves, failures) for _, saves, failures in writes] == [(10, []), (10, [])]
    assert read_failures == [] and loads >= 5
    assert set(seen) <= {1.0} | {100.0 + i for i in range(10)} | {200.0 + i for i in range(10)}
    assert _value(path) in (109.0, 209.0)  # the last save of one writer or the other
    sk.save(_model(7.0), path)  # a version the reader held when it was replaced goes now
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.lock", os.readlink(path), "m"]


def test_stale_temporaries_are_cleaned_but_not_a_version_being_read(tmp_path):
    path = sk.save(_model(1.0), tmp_path / "m")
    sk.save(_model(5.0), tmp_path / "m.v2")  # a neighbour whose names start like ours
    stale = [tmp_path / f".m.v-{'0' * 32}", tmp_path / ".m.ab12cd34", tmp_path / ".m.old-123"]
    for d in stale:  # a crashed save's version; temporaries of the saves before versions
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    (tmp_path / f".m.link-{'1' * 32}").symlink_to(".m.gone")
    (tmp_path / ".m.settings").mkdir()  # not ours: holds a file slimkit never writes
    (tmp_path / ".m.settings" / "notes.txt").write_text("keep")
    with artifact_store.reading(path) as snap:
        sk.save(_model(2.0), path)
        assert (snap.directory / "model.safetensors").is_file()  # held by this reader: kept
        assert _value(path) == 2.0
    held = snap.directory
    sk.save(_model(3.0), path)
    assert not held.exists()
    ours = sorted(p.name for p in tmp_path.iterdir() if p.name in ("m", ".m.lock") or p.name.startswith(".m.")
                  and not p.name.startswith(".m.v2."))
    assert ours == [".m.lock", ".m.settings", os.readlink(path), "m"]
    assert _value(tmp_path / "m.v2") == 5.0
