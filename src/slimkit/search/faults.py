"""Named points in a search where a test can kill the process, so crash consistency is tested
deterministically (at each step) instead of by racing a timer.

``SLIMKIT_FAULT_AT="trial started@2"`` ends the process with ``os._exit(FAULT_EXIT)`` (no cleanup,
like SIGKILL) when trial 2 starts; without ``@N`` the first time the step is reached.
``SLIMKIT_FAULT_SIGNAL=SIGTERM`` (or ``SIGINT``) sends that signal to the process instead, to test
the clean stop. Unset (the normal case) every point is a dictionary look-up and nothing else.
"""

from __future__ import annotations

import os
import signal

from slimkit.core.errors import SlimkitError

FAULT_EXIT = 97  # the exit status of a process a fault point ended (not one Python or a signal gives)

#: Every point, in the order a search reaches them.
STEPS = (
    "baseline measured",   # the original measured, nothing in the storage yet
    "study created",       # the study's row exists, its settings not yet written
    "study ready",         # settings and first guesses written, no trial taken
    "trial started",       # a trial is RUNNING, nothing measured (@N: trial number)
    "trial measured",      # its measurement is stored, the trial not yet told (@N: trial number)
    "trial told",          # the trial is COMPLETE (@N: trial number)
    "trials done",         # the count is reached, nothing written to the run directory yet
    "best saved",          # best/ and recipe.yaml written, result.json not yet
    "result written",      # result.json (and the report) written
)


def fault_point(step: str, number: int | None = None) -> None:
    """End the process here if ``SLIMKIT_FAULT_AT`` names this step (and number); see the module docstring."""
    wanted = os.environ.get("SLIMKIT_FAULT_AT")
    if not wanted:
        return
    name, _, at = wanted.partition("@")
    if name not in STEPS:
        raise SlimkitError(f"SLIMKIT_FAULT_AT={wanted!r} names no fault point",
                           f"use one of: {', '.join(STEPS)} (optionally @N)")
    if name != step or (at and (number is None or int(at) != number)):
        return
    how = os.environ.get("SLIMKIT_FAULT_SIGNAL")
    if how:
        os.environ.pop("SLIMKIT_FAULT_AT")  # once: the stop that follows must not trip it again
        os.kill(os.getpid(), getattr(signal, how))
        return
    os._exit(FAULT_EXIT)
