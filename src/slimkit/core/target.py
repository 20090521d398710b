"""A deployment target: the limits a candidate must fit, turned into a constraint vector."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from slimkit.core.errors import SlimkitError


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What was measured about one candidate; ``None`` means not measured (yet)."""

    size_mb: float | None = None
    latency_ms: float | None = None
    memory_mb: float | None = None
    drop: float | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    """Limits for a candidate; a limit left as ``None`` is not constrained.

    ``max_drop`` is in the task metric's own units (0.01 = one accuracy point), measured
    against the baseline in the direction the task calls worse.
    """

    max_size_mb: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    max_drop: float | None = None
    device: str = "cpu"
    threads: int | None = None
    #: p50 latency at most this multiple of the original's ("no slower than the original" = 1.0). The search
    #: turns it into ``max_latency_ms`` from its first timing of the original; the end of the run re-times
    #: the best and the original together and confirms the limit against that re-timed original.
    max_latency_vs_original: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_size_mb", "max_latency_ms", "max_memory_mb", "max_drop", "max_latency_vs_original"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0 or (value == 0 and name != "max_drop"):
                raise SlimkitError(f"target {name}={value!r} is impossible",
                                   f"give {name} a positive number, or leave it out")
        if self.threads is not None and self.threads < 1:
            raise SlimkitError(f"target threads={self.threads} is invalid", "use a thread count of 1 or more")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise SlimkitError(f"target device {self.device!r} is not supported", "use 'cpu' or 'cuda'")

    def names(self) -> list[str]:
        """Names of the constrained quantities, in constraint-vector order."""
        return [n for n in ("size_mb", "latency_ms", "memory_mb", "drop") if getattr(self, f"max_{n}") is not None]

    def constraints(self, m: Measurement) -> list[float]:
        """Optuna's convention: one value per limit, ``<= 0`` feasible, the value is the overshoot.

        A quantity that was not measured counts as infeasible (+inf): we never assume a fit.
        """
        out = []
        for name in self.names():
            value = getattr(m, name)
            out.append(math.inf if value is None else float(value) - float(getattr(self, f"max_{name}")))
        return out

    def feasible(self, m: Measurement) -> bool:
        return all(c <= 0 for c in self.constraints(m))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_original_latency(self, original_ms: float) -> Target:
        """``max_latency_ms`` from ``max_latency_vs_original`` and a timing of the original (the tighter
        of the two when both are given); unchanged when no relative limit was asked for."""
        if self.max_latency_vs_original is None or not original_ms > 0:
            return self
        limit = self.max_latency_vs_original * original_ms
        if self.max_latency_ms is not None:
            limit = min(limit, self.max_latency_ms)
        return dataclasses.replace(self, max_latency_ms=limit)
