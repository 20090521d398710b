"""An exception from the user's own code (a ``--task`` / ``--model`` function) as one line and its frame.

A ``package.module:function`` task that raises, say, a ``KeyError`` halfway through a run used to
print pages of traceback, most of it slimkit's and torch's frames. What the user needs is what was
raised and where in *their* code: the deepest frame outside slimkit, torch, the standard library
and installed packages. ``slimkit --debug COMMAND ...`` shows the full traceback instead; an
exception with no frame of the user's (a bug in slimkit or a library) always does.
"""

from __future__ import annotations

import linecache
import site
import sysconfig
import traceback
from pathlib import Path
from types import TracebackType

#: slimkit's own package directory (slimkit/cli/user_errors.py -> slimkit/).
PACKAGE = Path(__file__).resolve().parents[1]


def _not_yours() -> tuple[str, ...]:
    """Directories whose frames are not the user's code: slimkit, the standard library, installed packages."""
    places = {PACKAGE, *(Path(sysconfig.get_paths()[k]) for k in ("stdlib", "purelib", "platlib"))}
    places.update(Path(p) for p in site.getsitepackages())
    return tuple(str(p.resolve()) + "/" for p in places)


def user_frame(tb: TracebackType | None) -> traceback.FrameSummary | None:
    """The deepest frame of ``tb`` in the user's own code, or None when every frame is slimkit's or a library's."""
    skip = _not_yours()
    found = None
    for frame in traceback.extract_tb(tb):
        path = str(Path(frame.filename).resolve())
        if not frame.filename.startswith("<") and not path.startswith(skip):
            found = frame
    return found


def describe(exc: BaseException, frame: traceback.FrameSummary) -> tuple[str, str]:
    """The two lines printed: what was raised (one line), and the user's frame with its source line."""
    message = " ".join(str(exc).split())
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    source = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
    return (f"error: {what} — raised in your code (below); run again as slimkit --debug COMMAND ... for the "
            "full traceback",
            f"  {frame.filename}:{frame.lineno} in {frame.name}: {source}")


__all__ = ["describe", "user_frame"]
