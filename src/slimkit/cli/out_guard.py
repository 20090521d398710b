"""``--out`` checked before any work: a directory slimkit can write, held by one run at a time.

A job takes seconds to minutes; finding out at the end that ``--out`` is a file, read-only or on a
full disk wastes all of it, and two runs writing one directory silently replace each other's
files. :func:`guarded_out` therefore, before the command does anything else:

1. refuses an ``--out`` that is a file (or sits under one);
2. takes an exclusive, non-blocking ``flock`` on a lock file beside it (``.NAME.slimkit-lock``;
   inside the directory when its parent cannot be written). A second run on the same ``--out``
   is refused at once. The kernel drops the lock when the process dies, so the file a killed run
   leaves behind blocks nobody;
3. creates the directory and writes, syncs and removes a probe file in it, which fails on a
   read-only place, a full disk or a file-size limit.

On a failed command the directories it created stay only if something was written into them.

Before all that, :func:`check_fresh_out` refuses an ``--out`` that already holds a run (or anything
else), unless ``--overwrite`` is given: a rerun no longer silently replaces the previous results.
Two things are not a previous run: names starting with ``.`` (lock and probe files) and
``checkpoints/``, what a killed technique command leaves for the same command to resume from.
``slimkit optimize --resume`` continues the run in its ``--out`` by definition.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

import typer

from slimkit.core.errors import SlimkitError

#: Bytes written (and synced) to prove ``--out`` can take data; a full disk fails on them.
PROBE_BYTES = 64 * 1024
LOCK_SUFFIX = ".slimkit-lock"


@contextlib.contextmanager
def guarded_out(out: Path, option: str = "--out", *, create: bool = True) -> Iterator[Path]:
    """Hold ``out`` (checked writable, exclusively locked) for the body; release it on exit."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise SlimkitError(f"{option} {out} is a file, not a directory", f"give {option} a directory path")
    above = next((p for p in out.parents if p.exists()), out)
    if not above.is_dir():
        raise SlimkitError(f"{option} {out} sits under the file {above}", f"give {option} a directory path")
    if not create and not out.is_dir():
        raise SlimkitError(f"{option} {out} is not a directory", "give the directory of a finished run")
    created = _make_dirs(out.parent, option)
    try:
        with _exclusive_lock(out, option):
            created += _make_dirs(out, option)
            _probe(out, option)
            yield out
    except BaseException:
        _remove_empty(created)
        raise


OVERWRITE = typer.Option(False, "--overwrite", help="write into --out even when it holds a previous run")
#: Entries of --out that are not a finished run: an unfinished technique run resumes from its checkpoints.
RESUMABLE = ("checkpoints",)


def check_fresh_out(out: Path, *, overwrite: bool, resume: bool | None = None, option: str = "--out") -> None:
    """Refuse an ``out`` that holds a previous run, unless ``overwrite`` (or ``resume``) says to go on.

    ``resume`` is None for commands without ``--resume``. Runs before :func:`guarded_out` and changes
    nothing, not even the directory's modification time; a run still writing there is named as such.
    """
    if overwrite and resume:
        raise SlimkitError("--overwrite and --resume contradict each other",
                           f"give --resume to continue the run in {option}, or --overwrite to start it again")
    out = Path(out).expanduser().resolve()
    if overwrite or resume or not out.is_dir():
        return
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name not in RESUMABLE)
    if held:
        holder = _lock_holder(out)
        if holder is not None:
            raise _busy(out, holder, option)
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        also = ", --resume to continue it," if resume is not None else ""
        raise SlimkitError(f"{option} {out} is not empty (it holds {shown})",
                           f"pass --overwrite to replace what is there{also} or give {option} another directory")


def _lock_candidates(out: Path) -> list[Path]:
    return [out.parent / f".{out.name or 'root'}{LOCK_SUFFIX}", out / LOCK_SUFFIX]


def _lock_holder(out: Path) -> Path | None:
    """The lock file of a run writing ``out`` now, if any; found without creating anything."""
    for path in _lock_candidates(out):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # refused only while a run holds it exclusively
        except BlockingIOError:
            return path
        except OSError:
            continue
        finally:
            os.close(fd)  # drops the shared lock at once
    return None


def _busy(out: Path, path: Path, option: str) -> SlimkitError:
    return SlimkitError(f"another slimkit run is writing {option} {out} (it holds {path})",
                        f"wait for it to finish, or give {option} another directory")


def check_file_target(path: Path, option: str) -> None:
    """A file option (e.g. ``--json``): not a directory, in a directory that exists or can be made."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise SlimkitError(f"{option} {path} is a directory", f"give {option} a file path")
    above = next((p for p in path.parents if p.exists()), path)
    if not above.is_dir():
        raise SlimkitError(f"{option} {path} sits under the file {above}", f"give {option} another path")
    if not os.access(above, os.W_OK):
        raise SlimkitError(f"{option} {path}: {above} is not writable", f"give {option} a writable path")


def _make_dirs(path: Path, option: str) -> list[Path]:
    """``mkdir -p path``; returns the directories it created, deepest last."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise SlimkitError(f"{option}: cannot create {path} ({_reason(exc)})",
                           f"give {option} a place you can write") from None
    return missing


@contextlib.contextmanager
def _exclusive_lock(out: Path, option: str) -> Iterator[Path]:
    lock = _open_lock(out, option)
    fd, path = lock
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding the lock: a waiting run re-checks the inode (see _open_lock)
        os.close(fd)


def _open_lock(out: Path, option: str) -> tuple[int, Path]:
    """An fd holding ``flock(LOCK_EX)`` on the lock file of ``out``, and that file's path."""
    candidates = _lock_candidates(out)
    last: OSError | None = None
    for path in candidates:
        if path.parent == out and not out.is_dir():
            break
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                last = exc
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(out, path, option) from None
            except OSError as exc:
                os.close(fd)
                last = exc
                break
            if _same_file(fd, path):
                return fd, path
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
    reason = _reason(last) if last is not None else "no place for a lock file"
    raise SlimkitError(f"{option}: cannot lock {out} ({reason})", f"give {option} a place you can write")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _probe(out: Path, option: str) -> None:
    try:
        with tempfile.NamedTemporaryFile(dir=out, prefix=".slimkit-probe-") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise SlimkitError(f"{option} {out} cannot be written ({_reason(exc)})",
                           f"free some space or give {option} a place you can write") from None


def _remove_empty(dirs: list[Path]) -> None:
    for d in reversed(dirs):  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def _reason(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__


__all__ = ["LOCK_SUFFIX", "OVERWRITE", "RESUMABLE", "check_file_target", "check_fresh_out", "guarded_out"]
