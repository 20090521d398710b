"""Where an artifact's files live, and how a save replaces them so no reader sees half of it.

Layout beside the path ``out/model`` a user passes to ``sk.save`` / ``sk.load``::

    out/model             symlink -> .model.v-<hex>  (swapped in one step by os.replace)
    out/.model.v-<hex>/   model.safetensors + slimkit.json: one version, never changed once linked
    out/.model.lock       a save holds an exclusive flock on it from start to end

A save: lock; delete stale temporaries of earlier crashed saves; write a new version directory;
point a temporary symlink at it; rename that symlink over the path (atomic: the path always
names a complete artifact); delete the old version unless a reader still holds it. A reader
takes a shared flock on its version's ``slimkit.json`` for as long as it reads, and a save only
deletes a version whose lock it can take, so a version never disappears under a reader.

Plain directories at the path (written by slimkit before versioned saves, or by hand) load as
before. The first save over one swaps it with the symlink by an atomic exchange (Linux
``renameat2``); where the OS has none it renames the old directory to ``.model.old`` first and
readers look there if a crash fell between the two renames.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

from slimkit.core.atomic import exchange, file_lock, fsync_dir, lock_shared, try_lock_exclusive
from slimkit.core.errors import SlimkitError

WEIGHTS = "model.safetensors"
META = "slimkit.json"
#: The points a save passes, in order ("moved_aside" only where the OS cannot exchange two paths).
SAVE_STEPS = ("locked", "cleaned", "weights_written", "sidecar_written", "synced", "linked", "moved_aside",
              "swapped", "retired")
#: Called with each step name as a save reaches it; crash-consistency tests end the process there.
step_hook: Callable[[str], None] | None = None
_TOKEN = r"[0-9a-f]{32}"
_LEGACY_TEMP = re.compile(r"[a-z0-9_]{8}|old-\d+")  # temp names of the plain-directory saves before this scheme


def step(name: str) -> None:
    """Mark that a save reached ``name`` (one of :data:`SAVE_STEPS`)."""
    if step_hook is not None:
        step_hook(name)


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{suffix}")


def current_version(path: Path) -> Path | None:
    """The directory that holds the artifact at ``path`` now, or None when there is none."""
    if path.is_symlink():
        target = Path(os.readlink(path))
        return target if target.is_absolute() else path.parent / target
    if path.is_dir():
        return path
    if path.exists():
        raise SlimkitError(f"{path} exists and is not an artifact directory", "choose another output path")
    old = _sibling(path, "old")
    return old if old.is_dir() else None  # a save died between its two renames: the old artifact is here


def _stale(path: Path, keep: Path | None) -> list[Path]:
    """Leftovers of earlier saves of ``path`` that are not the current version."""
    prefix = f".{path.name}."
    out = []
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix) or (keep is not None and entry.name == keep.name):
            continue
        rest = entry.name[len(prefix):]
        if _ours(path, entry):
            out.append(entry)
        elif _LEGACY_TEMP.fullmatch(rest) and entry.is_dir() and not entry.is_symlink() \
                and {p.name for p in entry.iterdir()} <= {WEIGHTS, META}:
            out.append(entry)
    return out


def _ours(path: Path, entry: Path) -> bool:
    """Whether ``entry`` is a version, temporary link or moved-aside directory of the artifact at ``path``
    (never a directory elsewhere that a user's own symlink at ``path`` pointed to)."""
    prefix = f".{path.name}."
    return entry.parent == path.parent and entry.name.startswith(prefix) and \
        re.fullmatch(rf"(v|link)-{_TOKEN}|old", entry.name[len(prefix):]) is not None


def remove_unless_read(entry: Path) -> bool:
    """Delete a version directory (or stray link) unless a reader holds its ``slimkit.json``."""
    if entry.is_symlink() or not entry.is_dir():
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
        return True
    try:
        fd = os.open(entry / META, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        fd = None
    try:
        if fd is not None:
            if not try_lock_exclusive(fd):
                return False
            os.unlink(entry / META)  # first, so a reader that locks it after us sees it gone
        shutil.rmtree(entry, ignore_errors=True)
    finally:
        if fd is not None:
            os.close(fd)
    return True


def replace_artifact(path: Path, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Run ``write(directory)`` on a fresh version directory and make it the artifact at ``path``.

    Saves to one path from several processes take turns (an exclusive lock); a crash at any
    point leaves ``path`` naming the old artifact or the new one, and the next save cleans up.
    ``durable`` also fsyncs files and directories before the swap, so a power cut does too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    current_version(path)  # refuses a plain file before anything is written
    try:
        with file_lock(_sibling(path, "lock")):
            _replace_locked(path, write, durable)
    except PermissionError as exc:
        raise SlimkitError(f"cannot write {exc.filename or path} (permission denied)",
                           "choose a directory you can write to") from None
    return path


def _replace_locked(path: Path, write: Callable[[Path], None], durable: bool) -> None:
    step("locked")
    current = current_version(path)
    for entry in _stale(path, current):
        remove_unless_read(entry)
    step("cleaned")
    token = secrets.token_hex(16)
    version, link = _sibling(path, f"v-{token}"), _sibling(path, f"link-{token}")
    os.mkdir(version)  # 0777 minus the umask, like any directory
    try:
        write(version)
        if durable:
            for name in (WEIGHTS, META):
                _fsync_file(version / name)
            fsync_dir(version)
        step("synced")
        try:
            os.symlink(version.name, link)  # relative: the pair can be moved or copied together
            entry = link
        except OSError:  # a file system without symbolic links: the version directory takes the path itself
            entry = version
        step("linked")
        retired = _swap(entry, path, current)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            if link.is_symlink():
                link.unlink()
        if current_version(path) != version:
            shutil.rmtree(version, ignore_errors=True)
        raise
    step("swapped")
    if durable:
        fsync_dir(path.parent)
    if retired is not None and _ours(path, retired):
        remove_unless_read(retired)
    step("retired")


def _swap(link: Path, path: Path, current: Path | None) -> Path | None:
    """Put ``link`` (a symlink, or a directory) at ``path`` in one step; returns what the path held
    before, to delete."""
    if path.is_symlink() or not path.exists():
        os.replace(link, path)
        return current
    if exchange(link, path):  # the plain directory now sits at the link's temporary name
        return link
    old = _sibling(path, "old")
    os.rename(path, old)  # a reader finds the old artifact here until the next line runs
    step("moved_aside")
    os.replace(link, path)
    return old


def _fsync_file(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Snapshot:
    """One version of an artifact, locked against deletion while it is read."""

    def __init__(self, path: Path, directory: Path, fd: int) -> None:
        self.path, self.directory, self.fd = path, directory, fd
        st = os.fstat(fd)
        self._ident = (st.st_dev, st.st_ino)

    def still_current(self) -> bool:
        """Whether ``directory`` still holds the locked sidecar. Only a plain directory at the path
        can be swapped away under a reader; a version directory is never renamed."""
        try:
            st = os.stat(self.directory / META)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ident


@contextlib.contextmanager
def reading(path: Path, attempts: int = 50) -> Iterator[Snapshot]:
    """The artifact's current version, held so a concurrent save cannot delete it meanwhile."""
    if path.is_file():
        raise SlimkitError(f"{path} is not a slimkit artifact (a file, not a directory)", "pass the artifact directory")
    for _ in range(attempts):
        directory = current_version(path)
        if directory is None:
            raise SlimkitError(f"{path} is not a slimkit artifact (no such directory)", "check the path")
        try:
            fd = os.open(directory / META, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            if current_version(path) != directory:
                continue  # a save replaced it meanwhile: read the new one
            raise SlimkitError(f"{path} is not a slimkit artifact (no {META})", "save it with slimkit.save first") from None
        except PermissionError:
            raise SlimkitError(f"cannot read {directory / META} (permission denied)",
                               "ask its owner to make the artifact readable (chmod -R a+rX)") from None
        try:
            lock_shared(fd)
            if os.fstat(fd).st_nlink == 0:  # deleted between our open and our lock: a newer version is linked
                continue
            yield Snapshot(path, directory, fd)
            return
        finally:
            os.close(fd)
    raise SlimkitError(f"{path} kept changing while it was read", "retry when the saves to it have finished")
