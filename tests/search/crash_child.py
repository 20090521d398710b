"""The killed side of the crash-consistency tests, imported once by a fork server.

Its children are forked from a process that never ran a multi-threaded torch op (forking one
that did can hang the child in OpenMP), and find the digits task already loaded.
"""

from __future__ import annotations

import os
import tempfile

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: a fork-safe process stays single-threaded

import torch  # noqa: E402

from slimkit import zoo  # noqa: E402
from slimkit.core.errors import SlimkitError  # noqa: E402
from slimkit.search.optimize import optimize  # noqa: E402
from slimkit.search.study import open_storage  # noqa: E402
from tests.search.test_optimize import FakeMeasurer  # noqa: E402

torch.set_num_threads(1)
TASK = zoo.load("digits")
with tempfile.TemporaryDirectory() as warm:  # Optuna, SQLAlchemy and the schema code, imported once here
    open_storage(f"sqlite:///{warm}/study.db").engine.dispose()
STOPPED = 2  # the exit status when the search raised its one-line error (written to said.txt)


def search(settings: dict, fault: str, signal_name: str | None) -> None:
    """Run the search with the fault armed and end the process the way the search ended."""
    os.environ["SLIMKIT_FAULT_AT"] = fault
    if signal_name:
        os.environ["SLIMKIT_FAULT_SIGNAL"] = signal_name
    try:
        optimize(TASK, measurer=FakeMeasurer(), progress=False, report=False, **settings)
    except SlimkitError as exc:
        (settings["out"] / "said.txt").write_text(str(exc))
        os._exit(STOPPED)
    os._exit(0)
