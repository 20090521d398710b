"""What a search knows when it ends, and reading a finished run back from its ``result.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit import io
from slimkit.core.atomic import atomic_write
from slimkit.core.errors import SlimkitError
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.pareto import TrialRecord

RESULT_FILE = "result.json"


@dataclasses.dataclass
class OptimizeResult:
    """Everything a finished (or stopped) search knows; ``best`` is None when nothing fit."""

    task: str
    target: Target
    baseline: TrialMeasurement
    trials: list[TrialRecord]
    best: TrialRecord | None
    pareto: list[TrialRecord]
    closest: list[TrialRecord]
    hints: list[str]
    sensitivity: dict[str, float]
    study: str
    storage: str
    seconds: float
    first_feasible: dict[str, float] | None = None   # trial count and seconds until the first fit
    best_model: nn.Module | None = dataclasses.field(default=None, repr=False)
    before_quantize: nn.Module | None = dataclasses.field(default=None, repr=False)  # the float model it quantized
    out: Path | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # the command's time outside the report
    #: the best and the original re-timed together at the end (speed_ratio), and whether the latency limit held
    speed: dict[str, Any] | None = None
    #: where ``best/`` came from: "incumbent" (saved when its trial finished, copied) or "replayed" (rebuilt)
    best_source: str | None = None
    #: why the trials ended: the count reached, the time budget, or the wait for other workers
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "target": self.target.to_dict(), "baseline": self.baseline.to_dict(),
                "best": None if self.best is None else self.best.to_dict(),
                "pareto": [r.number for r in self.pareto], "closest": [r.to_dict() for r in self.closest],
                "hints": self.hints, "sensitivity": self.sensitivity, "study": self.study,
                "storage": self.storage, "seconds": self.seconds, "first_feasible": self.first_feasible,
                "phases": self.phases, "speed": self.speed, "best_source": self.best_source,
                "stopped": self.stopped, "trials": [r.to_dict() for r in self.trials]}


def write_result(result: OptimizeResult, data: dict[str, Any] | None = None) -> Path:
    """``result.json`` in the run directory, replaced atomically (a kill leaves the old one or the new)."""
    text = json.dumps(result.to_dict() if data is None else data, indent=2, default=str).encode()
    return atomic_write(Path(result.out) / RESULT_FILE, lambda f: f.write(text))


def read_result(run_dir: str | Path, task: Task) -> OptimizeResult:
    """A finished run rebuilt from its ``result.json`` and ``best/`` artifact (for ``slimkit report``)."""
    run_dir = Path(run_dir)
    path = run_dir / RESULT_FILE
    if not path.is_file():
        raise SlimkitError(f"{run_dir} holds no {RESULT_FILE}", "give the --out directory of a finished slimkit optimize")
    try:
        data = json.loads(path.read_text())
        records = [TrialRecord(t["number"], t["recipe"], TrialMeasurement(**t["measured"]), t["constraints"],
                               t.get("params", {})) for t in data["trials"]]
        target = Target(**data["target"])
        baseline = TrialMeasurement(**data["baseline"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise SlimkitError(f"{path} is not a slimkit result file ({exc})", "re-run slimkit optimize") from None
    by_number = {r.number: r for r in records}
    best = by_number.get(data["best"]["number"]) if data.get("best") else None
    result = OptimizeResult(task=data["task"], target=target, baseline=baseline, trials=records, best=best,
                            pareto=[by_number[n] for n in data["pareto"] if n in by_number],
                            closest=[by_number[c["number"]] for c in data["closest"] if c["number"] in by_number],
                            hints=data["hints"], sensitivity=data["sensitivity"], study=data["study"],
                            storage=data["storage"], seconds=data["seconds"], first_feasible=data["first_feasible"],
                            out=run_dir, phases=data.get("phases", {}),
                            best_source=data.get("best_source"), stopped=data.get("stopped"))
    if best is not None:
        result.best_model = io.load(run_dir / "best")
    return result
