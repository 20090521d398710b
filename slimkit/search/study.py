"""Where a search lives: an Optuna study in a database, so a killed run resumes and machines can share it.

SQLite in the run directory by default; ``postgresql://...`` when several workers (machines) take
trials from one study. Heartbeats mark a trial whose worker died as failed once it has been
silent for ``GRACE_S``; the retry callback queues the same parameters again, so the trial is
re-run, not lost. A run resumed on purpose (``resume=True``) knows its previous process is
gone, so it fails and re-queues that process's in-flight trial right away.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from slimkit.core.errors import SlimkitError
from slimkit.search.budget import TimeBudget, enough_for_another

log = logging.getLogger("slimkit.search")

HEARTBEAT_S = 5
GRACE_S = 20
MAX_RETRY = 2
SCHEMA_RACE_TRIES = 5
SCHEMA_RACE_SIGNS = ("already exists", "UNIQUE constraint failed", "duplicate key")


def storage_url(out: Path | None, storage: str | None) -> str:
    """The database URL: the user's, or ``sqlite:///<out>/study.db``."""
    if storage:
        if not storage.startswith(("sqlite:///", "postgresql://", "postgresql+", "mysql://", "mysql+")):
            raise SlimkitError(f"storage {storage!r} is not a database URL",
                               "use sqlite:///path/study.db or postgresql://user@host/db")
        if storage.startswith("postgresql://"):  # the driver slimkit[search] installs, whatever SQLAlchemy's default
            storage = "postgresql+psycopg://" + storage[len("postgresql://"):]
        return storage
    if out is None:
        raise SlimkitError("no storage given and no output directory to put study.db in", "pass out= or storage=")
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(out / 'study.db').resolve()}"


def open_storage(url: str) -> Any:
    """Optuna RDB storage with heartbeats and retry of trials whose worker died."""

    import optuna  # optional (optuna, extra 'search'): imported when used
    from optuna.storages import RDBStorage  # optional (optuna, extra 'search'): imported when used

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=_retry_callback())
        except Exception as exc:  # SQLAlchemy raises many types; the user needs the URL and the reason
            # Processes opening a new database at once all create the schema; the losers see a
            # duplicate table or version row and succeed on a later try once the winner committed.
            if any(m in str(exc) for m in SCHEMA_RACE_SIGNS) and attempt + 1 < SCHEMA_RACE_TRIES:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise SlimkitError(f"cannot open study storage {_redact(url)}: {str(exc).splitlines()[0][:160]}",
                               "check the URL, that the server runs and the database exists") from None
    raise AssertionError("unreachable")


def _retry_callback() -> Any:
    """Re-queue a dead worker's trial (Optuna renamed the callback in 4.9; older names still work before)."""
    from optuna import storages  # optional (optuna, extra 'search'): imported when used

    klass = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    return klass(max_retry=MAX_RETRY)


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def create_study(storage: Any, name: str, sampler: Any, *, resume: bool, attrs: dict[str, Any]) -> Any:
    """A new study named ``name`` (error if it exists and ``resume`` is off), or the existing one to resume."""
    import optuna  # optional (optuna, extra 'search'): imported when used

    existing = {s.study_name for s in optuna.study.get_all_study_summaries(storage)}
    if name in existing and not resume:
        raise SlimkitError(f"study {name!r} already exists in this storage",
                           "pass --resume to continue it, or choose another --out / --study")
    if name not in existing and resume:
        raise SlimkitError(f"there is no study {name!r} to resume", "drop --resume to start a new search")
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=resume,
                                directions=["minimize", "minimize", "minimize"])
    if name not in existing:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
    return study


def load_study(storage: Any, name: str, sampler: Any) -> Any:
    import optuna  # optional (optuna, extra 'search'): imported when used

    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise SlimkitError(f"there is no study {name!r} in this storage",
                           "start it with `slimkit optimize --storage URL --study NAME` first") from None


def requeue_interrupted(study: Any) -> list[int]:
    """Fail the trials a dead process left RUNNING and queue their parameters again; returns their numbers."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    retry = _retry_callback()
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            retry(study, study._storage.get_trial(t._trial_id))
            numbers.append(t.number)
    if numbers:
        log.warning("re-queued trial(s) %s interrupted by the previous run", numbers)
    return numbers


def finished(study: Any) -> int:
    """Trials that ended with a measurement (infeasible ones included)."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def run_trials(study: Any, objective: Callable[[Any], Any], n_trials: int, *, budget: TimeBudget | None = None,
               reserve_s: float = 0.0, on_trial: Callable[[Any], None] | None = None) -> None:
    """Take trials until ``n_trials`` have finished study-wide (other workers' included) or time is up.

    One trial per ``optimize`` call, so the count is re-read from the database before each trial:
    two workers never overshoot by more than the trial each has in flight. A trial starts only when
    a typical one (the median so far) still ends before ``budget`` less ``reserve_s``.
    """
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    budget = budget or TimeBudget(None)
    while True:
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if finished(study) + running >= n_trials:
            return
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        seconds = [t.user_attrs["measured"].get("seconds", 0.0) for t in done if "measured" in t.user_attrs]
        if not enough_for_another(seconds, budget.left(), reserve_s):
            log.warning("time budget reached after %d trials", finished(study))
            return
        callbacks = [] if on_trial is None else [lambda _study, trial: on_trial(trial)]
        study.optimize(_within_count(objective, n_trials), n_trials=1, catch=(), gc_after_trial=True,
                       callbacks=callbacks)


def _within_count(objective: Callable[[Any], Any], n_trials: int) -> Callable[[Any], Any]:
    """Prune a trial that two workers started at once past the count (trial numbers decide who goes on)."""
    import optuna  # optional (optuna, extra 'search'): imported when used
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    def guarded(trial: Any) -> Any:
        ahead = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= n_trials:
            raise optuna.TrialPruned(f"the study already has {n_trials} trials")
        return objective(trial)

    return guarded
