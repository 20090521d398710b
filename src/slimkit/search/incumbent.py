"""The best candidate so far, saved when it is found, so the end of a search copies it instead of
rebuilding it (a replay of prune + fine-tuning + quantization can take as long as a trial, outside
the trials' time).

``OUT/incumbent`` is an artifact (:mod:`slimkit.io.artifact_store`: versioned, swapped atomically).
Its own ``slimkit.json`` carries ``extra.incumbent = {"trial", "rank", "run"}``: the trial number,
its rank (drop, MB, ms, then the trial number: the order :func:`~slimkit.search.pareto.pick_best`
uses) and the study's run token, so an incumbent left by an earlier study in the same directory
never counts. Kept in the artifact's sidecar, the numbers change in the same swap as the weights.

Every process taking trials of the study (``optimize`` and the workers that can reach the
directory) offers each feasible trial of its own once the storage holds it finished. Under an
exclusive lock beside the artifact it reads the stored rank and replaces the artifact only when the
new trial ranks first, so the saved one is the best of the trials saved by anyone. At the end,
:meth:`Incumbent.copy_to` checks it (integrity, run token) and copies its files to ``best/``; the
caller compares its trial with the study's best and replays the recipe only when they differ or
the incumbent is missing or damaged.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import torch.nn as nn

from slimkit import io
from slimkit.core.atomic import file_lock
from slimkit.core.errors import SlimkitError
from slimkit.io.artifact_store import reading, replace_artifact
from slimkit.io.loaded_form import loads_unannounced
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.pareto import TrialRecord, objectives

log = logging.getLogger("slimkit.search")

#: The incumbent's directory in the run directory.
INCUMBENT_DIR = "incumbent"
#: ``extra`` key of the incumbent's sidecar.
KEY = "incumbent"


def rank(measured: TrialMeasurement, number: int) -> list[float]:
    """What orders candidates, smallest first: pick_best's (drop, MB, ms), ties to the earlier trial."""
    return [*objectives(measured), float(number)]


@dataclasses.dataclass
class Held:
    """The candidate of the trial in flight, kept until the storage says that trial finished."""

    number: int
    model: nn.Module
    before_quantize: nn.Module | None
    measured: TrialMeasurement
    recipe: list[dict[str, Any]]


@dataclasses.dataclass
class Saved:
    """The incumbent as copied to ``best/``: its trial and the model loaded from it."""

    number: int
    model: nn.Module


class Incumbent:
    """``OUT/incumbent`` of one study (``path`` None: this process cannot reach it; nothing is saved)."""

    def __init__(self, path: Path | None, run: str, task_name: str) -> None:
        self.path, self.run, self.task_name = path, run, task_name
        self.held: Held | None = None
        self.mine: Held | None = None  # the last one this process saved (its float model too, for the report)
        self.saves = 0

    def hold(self, number: int, model: nn.Module | None, before_quantize: nn.Module | None,
             record: TrialRecord) -> None:
        """Keep a feasible trial's model until it is told (a trial failed meanwhile is never saved)."""
        self.held = None
        if self.path is None or model is None or not (record.feasible and record.evaluated):
            return
        self.held = Held(number, model, before_quantize, record.measured, record.recipe)

    def after_trial(self, frozen: Any) -> bool:
        """Called once the storage holds trial ``frozen`` finished: offer its model; True when it was saved."""
        held, self.held = self.held, None
        if held is None or held.number != frozen.number or frozen.state.name != "COMPLETE":
            return False
        try:
            saved = self.offer(held)
        except (OSError, SlimkitError) as exc:  # the search goes on; the end replays the best if it must
            log.warning("the best so far (trial %d) could not be saved in %s: %s", held.number, self.path, exc)
            return False
        if saved:
            self.mine = held
        return saved

    def offer(self, held: Held) -> bool:
        """Save ``held`` if it ranks before the stored incumbent (checked again under the lock)."""
        assert self.path is not None
        new = rank(held.measured, held.number)
        if not self._beats(new):  # most trials: no lock taken
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self.path.with_name(f".{self.path.name}.claim")):
            if not self._beats(new):
                return False
            io.save(held.model, self.path, recipe=held.recipe,
                    extra={"task": self.task_name, "trial": held.number, "backend": held.measured.backend,
                           KEY: {"trial": held.number, "rank": new, "run": self.run}})
        self.saves += 1
        return True

    def _beats(self, new: list[float]) -> bool:
        stored = self.stored()
        return stored is None or new < [float(v) for v in stored["rank"]]

    def stored(self) -> dict[str, Any] | None:
        """The stored incumbent's ``{"trial", "rank", "run"}``, or None (none, unreadable, another study's)."""
        if self.path is None or not (self.path.exists() or self.path.is_symlink()):
            return None
        try:
            info = io.read_meta(self.path).get("extra", {}).get(KEY)
        except (OSError, SlimkitError):
            return None
        if not isinstance(info, dict) or info.get("run") != self.run or not isinstance(info.get("rank"), list):
            return None
        return info

    def copy_to(self, dest: Path) -> Saved | str:
        """Copy the incumbent's files to ``dest`` byte for byte (when it is this study's) and load the copy,
        checking every tensor against its recorded checksum; the model, or why the incumbent cannot be used."""
        if self.path is None:
            return "no incumbent was kept (no run directory)"
        if not (self.path.exists() or self.path.is_symlink()):
            return f"no candidate was saved in {self.path} during the search"
        try:
            with reading(self.path) as snap:  # one version, held against a concurrent save's clean-up
                version = snap.directory
                info = io.read_meta(version).get("extra", {}).get(KEY) or {}
                if info.get("run") != self.run:
                    return f"{self.path} holds the best of another search, not of this study"
                replace_artifact(dest, lambda d: _copy_files(version, d))
            with loads_unannounced():  # slimkit's own check: the summary says where the deployable file is
                model = io.load(dest)  # the copy, checked like any artifact (and named as the user will see it)
        except (OSError, SlimkitError) as exc:
            return f"the saved incumbent in {self.path} cannot be used ({str(exc).splitlines()[0][:200]})"
        return Saved(int(info["trial"]), model)


def _copy_files(source: Path, dest: Path) -> None:
    for file in sorted(source.iterdir()):
        shutil.copyfile(file, dest / file.name)
