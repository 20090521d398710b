"""Ctrl-C and SIGTERM stop a search cleanly: the trial in flight is marked failed and queued again
(a resumed run re-runs it), and the user reads one line saying how to go on.

Without this, SIGTERM ends the process before Python runs any cleanup, leaving the trial RUNNING
until another process's heartbeat check gives up on it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

from slimkit.core.errors import SlimkitError

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stopping signal arrived. A ``KeyboardInterrupt`` so that Optuna marks the running trial
    failed exactly as it does for Ctrl-C; ``trial`` is the trial number re-queued, once known."""

    def __init__(self, signal_name: str = "SIGINT", trial: int | None = None) -> None:
        super().__init__(signal_name)
        self.signal_name, self.trial = signal_name, trial


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within this block SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (a second
    signal while the first is being handled is ignored, so the clean-up is not cut short).
    Elsewhere than in the main thread Python cannot take signals, and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[str] = []

    def raise_once(signum: int, _frame: Any) -> None:
        if not seen:
            seen.append(signal.Signals(signum).name)
            raise Interrupted(seen[0])

    previous = {s: signal.signal(s, raise_once) for s in STOPPING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stopped(exc: KeyboardInterrupt, done: int, total: int, how_to_go_on: str) -> SlimkitError:
    """The one line a stopped search prints: which signal, which trial was queued again, how to go on."""
    name = exc.signal_name if isinstance(exc, Interrupted) else "SIGINT"
    trial = exc.trial if isinstance(exc, Interrupted) else None
    queued = f"; trial {trial} marked failed and queued again" if trial is not None else ""
    return SlimkitError(f"search stopped by {name} with {done} of {total} trials finished{queued}", how_to_go_on)
