"""Write a file so that a reader sees the old content or the new, never half of it.

Also the POSIX pieces artifact storage builds on: advisory file locks (``flock``), an atomic
exchange of two paths (Linux ``renameat2(RENAME_EXCHANGE)``) and fsync of a directory.
Everything created here follows the process umask, like any file ``open()`` makes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

try:  # POSIX only; without it locks are no-ops (a single writer is then the caller's job)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: ``renameat2`` flag: swap two existing paths in one step.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def create_exclusive(path: str | os.PathLike[str]) -> int:
    """Open a new file for writing (fails if it exists) with mode 0666 minus the umask."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, sync: bool = False) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = create_exclusive(tmp)  # not mkstemp: that makes 0600 files whatever the umask says
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing, never deleted: deleting a lock
    file another process waits on would let two holders in)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def lock_shared(fd: int) -> None:
    """Shared ``flock`` on an open file: many readers, and no :func:`try_lock_exclusive` meanwhile."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)


def try_lock_exclusive(fd: int) -> bool:
    """Exclusive ``flock`` without waiting; False when someone holds a lock on the file."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28 / not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths atomically (either may be a directory); False where the OS or the
    file system cannot (then nothing changed)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in directory ``path`` durable (a no-op where dirs cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
