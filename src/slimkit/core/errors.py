"""One error type for everything a user can fix, so the CLI can print it as one line."""

from __future__ import annotations


class SlimkitError(Exception):
    """A problem the user can act on: ``problem`` says what is wrong, ``hint`` what to do."""

    def __init__(self, problem: str, hint: str = "") -> None:
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem} — {hint}" if hint else problem)
