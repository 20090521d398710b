"""The end of a search: read the study, put the best in ``best/``, write the recipe, result and report.

``best/`` is the incumbent the trials saved (:mod:`slimkit.search.incumbent`) copied byte for byte,
which takes seconds. Only when that copy is missing, damaged, or holds another trial than the
study's best (a best found by a worker that could not reach the run directory) is the best rebuilt
by replaying its recipe, as ``slimkit apply recipe.yaml`` would, and the reason said first.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from slimkit import io
from slimkit.core.target import Target
from slimkit.core.task import Task
from slimkit.pipeline.recipe import Recipe
from slimkit.search.evaluate import TrialMeasurement
from slimkit.search.faults import fault_point
from slimkit.search.incumbent import Incumbent, Saved
from slimkit.search.pareto import TrialRecord, closest, hints, pareto_front, pick_best
from slimkit.search.result import OptimizeResult, write_result
from slimkit.search.result_report import write_report
from slimkit.search.study import gone_here, worker_id

log = logging.getLogger("slimkit.search")

#: ``OptimizeResult.best_source``: where ``best/`` came from.
FROM_INCUMBENT, REPLAYED = "incumbent", "replayed"
#: Seconds after the best trial finished that another process may still be saving it, and between looks.
SAVE_WAIT_S, SAVE_POLL_S = 10.0, 0.5


def records_from_study(study: Any) -> list[TrialRecord]:
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        measured = TrialMeasurement(**t.user_attrs.get("measured", {}))
        out.append(TrialRecord(t.number, t.user_attrs.get("recipe", []), measured,
                               list(t.user_attrs.get("constraints", [1e9])), dict(t.params)))
    return out


def first_feasible(study: Any) -> dict[str, float] | None:
    """How many finished trials and seconds (from the study's first trial) until the first fit."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.datetime_complete)
    if not done:
        return None
    t0 = min(t.datetime_start for t in done)
    for i, t in enumerate(done, 1):
        if all(c <= 0 for c in t.user_attrs.get("constraints", [1e9])) and not t.user_attrs["measured"].get("error"):
            return {"trials": i, "seconds": (t.datetime_complete - t0).total_seconds(), "number": t.number}
    return None


def finish(study: Any, task: Task, target: Target, baseline: TrialMeasurement, sens: dict[str, float], name: str,
           url: str, out_dir: Path, start: float, *, seed: int, backend: str, report: bool,
           phases: dict[str, float] | None = None, incumbent: Incumbent | None = None, stopped: str | None = None,
           say: Callable[[str], None] | None = None) -> OptimizeResult:
    """Read the study, copy the saved incumbent to ``best/`` (or replay the best's recipe, saying why),
    save the recipe, write the report. ``stopped``: why the trials ended, kept in the result."""
    lap = time.monotonic()
    saved = incumbent.copy_to(out_dir / "best") if incumbent is not None else "no incumbent was kept"
    records = records_from_study(study)  # after the copy: the incumbent's trial is among them
    best = pick_best(records)
    result = OptimizeResult(task=task.name, target=target, baseline=baseline, trials=records, best=best,
                            pareto=pareto_front(records), closest=[] if best else closest(records, target),
                            hints=[] if best else hints(records, target, baseline), sensitivity=sens, study=name,
                            storage=url, seconds=time.monotonic() - start, first_feasible=first_feasible(study),
                            out=out_dir, phases=dict(phases or {}), stopped=stopped)
    if best is not None and incumbent is not None and not _is(saved, best):
        until = _may_still_save(study, best.number)
        if until is not None:
            saved = _wait_for_save(incumbent, out_dir / "best", best.number, saved, until)
    if best is not None:
        recipe = Recipe.from_steps(best.recipe, task=study.user_attrs.get("task", task.name), seed=seed,
                                   backend=best.measured.backend or backend, target=target.to_dict())
        if _is(saved, best):
            result.best_model, result.best_source = saved.model, FROM_INCUMBENT
            mine = incumbent.mine if incumbent is not None else None
            quantized = recipe.steps[-1].type_name.startswith("quantize.")
            result.before_quantize = mine.before_quantize if mine and mine.number == best.number and quantized \
                else None
            result.phases["copying the saved best"] = time.monotonic() - lap
        else:
            why = saved if isinstance(saved, str) else \
                f"the saved incumbent is trial {saved.number}, not the study's best (trial {best.number})"
            line = (f"best/: {why}; rebuilding trial {best.number} by replaying its recipe "
                    f"({' + '.join(s.type_name for s in recipe.steps)})")
            if say is not None:
                say(line)  # under the trial lines (a terminal or a log alike)
            else:
                log.warning("%s", line)
            _replay_into(result, recipe, task, best, out_dir, say)
            result.phases["rebuilding the best (replay)"] = time.monotonic() - lap
        recipe.save(out_dir / "recipe.yaml")
    fault_point("best saved")
    if report:
        write_report(result, task)
    else:
        write_result(result)
    fault_point("result written")
    return result


def _is(saved: Saved | str, best: TrialRecord) -> bool:
    return isinstance(saved, Saved) and saved.number == best.number


def _may_still_save(study: Any, number: int) -> float | None:
    """Until when (``time.time()``) another process may still be saving trial ``number``: it saves right
    after the trial is stored, so only shortly after it finished, and only while that process lives."""
    ran = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if ran is None or ran.datetime_complete is None or ran.user_attrs.get("worker") in (None, worker_id()) \
            or gone_here(ran):
        return None
    until = ran.datetime_complete.timestamp() + SAVE_WAIT_S
    return until if until > time.time() else None


def _wait_for_save(incumbent: Incumbent, dest: Path, number: int, saved: Saved | str, until: float) -> Saved | str:
    """Look again for trial ``number`` in the incumbent until ``until`` (``time.time()``)."""
    while time.time() < until:
        time.sleep(SAVE_POLL_S)
        if (incumbent.stored() or {}).get("trial") == number:
            return incumbent.copy_to(dest)
    return saved


def _replay_into(result: OptimizeResult, recipe: Recipe, task: Task, best: TrialRecord, out_dir: Path,
                 say: Callable[[str], None] | None) -> None:
    """The fallback: the best rebuilt from its recipe (each step's start and end said) and saved to ``best/``."""
    steps = recipe.replay_steps(task, announce=say)
    result.best_model, result.best_source = steps[-1], REPLAYED
    quantized = len(steps) > 1 and recipe.steps[-1].type_name.startswith("quantize.")
    result.before_quantize = steps[-2] if quantized else None
    io.save(result.best_model, out_dir / "best", recipe=best.recipe,
            extra={"task": task.name, "trial": best.number, "backend": best.measured.backend})
