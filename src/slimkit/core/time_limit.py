"""A wall-clock limit around third-party work that can run away (a dependency tracer on a graph it
does not know), so the caller gets a one-line reason instead of a process that never returns."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from slimkit.core.errors import SlimkitError


class TimeLimitExceeded(SlimkitError):
    """The work inside :func:`time_limit` ran past its limit."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str, fix: str) -> Iterator[None]:
    """Raise :class:`TimeLimitExceeded` ("``what`` did not finish within N s", ``fix``) if the block runs
    longer than ``seconds``. Needs the main thread (a POSIX interval timer); elsewhere it does not limit."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(_signum: int, _frame: object) -> None:
        raise TimeLimitExceeded(f"{what} did not finish within {seconds:g} s", fix)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


__all__ = ["TimeLimitExceeded", "time_limit"]
