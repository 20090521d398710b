"""The range of every numeric command-line option, checked before a model is loaded.

A NaN learning rate or a negative step count otherwise surfaces minutes later as a torch
traceback, or is silently accepted (``nan <= limit`` is False, so a NaN limit is never met). One
table by option name covers every command: the option means the same wherever it appears, and a
test checks that no numeric option of any command is missing from it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from slimkit.core.errors import SlimkitError


@dataclasses.dataclass(frozen=True)
class Bounds:
    """A finite number within ``[low, high]`` (either end open or absent), or one of ``choices``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[int, ...] = ()

    def fits(self, value: float) -> bool:
        if self.choices:
            return value in self.choices
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        if self.choices:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a number in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        return f"a number {'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Bounds(0, low_open=True)
NOT_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)
FRACTION = Bounds(0, 1, low_open=True)  # (0, 1]: a share kept

#: option (parameter name) -> its valid values; every int/float option of every command is here.
NUMERIC_OPTIONS: dict[str, Bounds] = {
    "threads": AT_LEAST_ONE, "trials": AT_LEAST_ONE, "time_budget": POSITIVE, "wait": NOT_NEGATIVE,
    "seed": Bounds(0, 2**32 - 1),                                   # numpy's and Optuna's seed range
    "max_size_mb": POSITIVE, "max_latency_ms": POSITIVE, "max_memory_mb": POSITIVE, "max_drop": NOT_NEGATIVE,
    "percentile": Bounds(50, 100, low_open=True), "group_size": NOT_NEGATIVE, "embedding_bits": Bounds(choices=(4, 8)),
    "amount": Bounds(0, 1, high_open=True), "macs_ratio": FRACTION, "round_to": AT_LEAST_ONE, "rank_multiple": AT_LEAST_ONE,
    "latency_batch": AT_LEAST_ONE, "n": AT_LEAST_ONE, "m": Bounds(2), "finetune_steps": NOT_NEGATIVE,
    "lr": POSITIVE, "steps": AT_LEAST_ONE, "temperature": POSITIVE, "alpha": Bounds(0, 1), "relational": NOT_NEGATIVE,
    "ratio": FRACTION, "energy": FRACTION,
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(values: Mapping[str, Any]) -> None:
    """Raise the one-line error for the first numeric option in ``values`` outside its range."""
    for name, value in values.items():
        bounds = NUMERIC_OPTIONS.get(name)
        if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isnan(value):
            raise SlimkitError(f"{flag(name)} nan is not a number", f"give {bounds.describe()}")
        if math.isinf(value):
            raise SlimkitError(f"{flag(name)} {value} is not finite", f"give {bounds.describe()}")
        if not bounds.fits(value):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            raise SlimkitError(f"{flag(name)} {shown} is out of range", f"give {bounds.describe()}")
    n, m = values.get("n"), values.get("m")
    if isinstance(n, int) and isinstance(m, int) and n >= m:
        raise SlimkitError(f"--n {n} --m {m} is not an N:M pattern", "keep n below m, e.g. --n 2 --m 4")


__all__ = ["NUMERIC_OPTIONS", "Bounds", "check_numbers", "flag"]
