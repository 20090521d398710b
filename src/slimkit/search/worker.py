"""``slimkit worker``: one more machine taking trials from a shared study.

Everything a worker needs is in the study itself (task, target, techniques, baseline,
sensitivity, seed), written by the ``slimkit optimize`` that created it, so a worker is started
with just the study's name and the database URL. Each worker samples with its own seed;
Optuna's constant-liar TPE keeps workers from proposing the same pipeline at once. A worker that
can reach the run directory (the same machine, or a shared file system) saves a trial that beats
the study's incumbent there, as ``optimize`` does; the end of the search copies it from there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from slimkit import zoo
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import searchable
from slimkit.core.target import Target
from slimkit.search.budget import TimeBudget
from slimkit.search.evaluate import RuntimeMeasurer, TrialMeasurement
from slimkit.search.incumbent import Incumbent
from slimkit.search.optimize import context_for, make_objective, make_sampler
from slimkit.search.interrupt import stop_on_signals, stopped
from slimkit.search.study import READY_KEY, finished, load_study, open_storage, storage_url
from slimkit.search.trial_loop import run_trials
from slimkit.search.trial_progress import TrialProgress


def study_attrs(storage: Any, name: str, wait_s: float) -> dict[str, Any]:
    """The study's settings, waiting up to ``wait_s`` for the creating run to measure its baseline."""
    import optuna  # optional (optuna, extra 'search'): imported when used

    deadline = time.monotonic() + wait_s
    while True:
        found = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage)}
        if name in found and READY_KEY in found[name].user_attrs:
            return dict(found[name].user_attrs)
        if time.monotonic() >= deadline:
            raise SlimkitError(f"there is no study {name!r} in this storage",
                               "start it with `slimkit optimize --storage URL --study NAME`, or check the name")
        time.sleep(1.0)


def work(study: str, storage: str, *, trials: int | None = None, time_budget: float | None = None,
         wait_s: float = 120.0, progress: bool = True, given_task: str | None = None) -> int:
    """Take trials until the study has ``trials`` finished (default: what its creator asked); returns that count.

    A worker stays until the count is reached even when the last trials run elsewhere: one whose
    worker died is queued again and taken here (see :mod:`slimkit.search.trial_loop`)."""

    db = open_storage(storage_url(None, storage))
    attrs = study_attrs(db, study, wait_s)
    task = zoo.load(zoo.trusted_spec(str(attrs.get("task") or ""), given_task, f"study {study!r}"))  # names, not code
    target = Target(**attrs["target"])
    baseline = TrialMeasurement(**attrs["baseline"])
    techs = searchable(list(attrs["techniques"]))
    total = int(trials or attrs["trials"])
    ctx = context_for(task, target, baseline, dict(attrs.get("sensitivity", {})), attrs.get("extra"),
                      attrs.get("max_techniques"))
    measure = RuntimeMeasurer(task, target, baseline.score, backend=attrs.get("backend", "auto"),
                              seed=int(attrs.get("seed", 0)))
    measure.asked = Target(**attrs.get("asked_target", attrs["target"]))
    sampler = make_sampler(attrs.get("strategy", "auto"), int(attrs.get("seed", 0)) + os.getpid(), total)
    st = load_study(db, study, sampler)
    keeper = Incumbent(_reachable(attrs.get("incumbent")), str(attrs.get("run", "")), task.name)
    objective = make_objective(ctx, techs, measure, [], keeper)
    with stop_on_signals():
        try:
            with TrialProgress(total, finished(st), enabled=progress, baseline_score=baseline.score) as bar:
                done = run_trials(st, objective, total, budget=TimeBudget(time_budget),
                                  on_trial=lambda t: bar.update(t, saved=keeper.after_trial(t)))
                bar.say(f"worker stopped: {done.reason}")
                return done
        except KeyboardInterrupt as exc:
            raise stopped(exc, finished(st), total, "start the worker again to go on; the study keeps "
                                                    "every finished trial") from None


def _reachable(incumbent: str | None) -> Path | None:
    """The study's incumbent path when its run directory exists here (else this worker saves nothing)."""
    if not incumbent or not Path(incumbent).parent.is_dir():
        return None
    return Path(incumbent)
