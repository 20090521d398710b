"""Where a search lives: an Optuna study in a database, so a killed run resumes and machines can share it.

SQLite in the run directory by default; ``postgresql://...`` when several workers (machines) take
trials from one study. A trial whose process died is failed and its parameters queued again, so
it is re-run, not lost: at once when that process ran on this machine (its id is gone), otherwise
once its heartbeat has been silent for the grace period (``SLIMKIT_HEARTBEAT_S``, default 5 s;
grace four heartbeats). A study is written in an order that makes every moment resumable: its
baseline, the setting workers wait for, is written last.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from slimkit.core.errors import SlimkitError
from slimkit.search.faults import fault_point

log = logging.getLogger("slimkit.search")

HEARTBEAT_S = 5
GRACE_HEARTBEATS = 4
MAX_RETRY = 2
READY_KEY = "baseline"  # the study setting written last: a study that has it is complete
SCHEMA_RACE_TRIES = 5
SCHEMA_RACE_SIGNS = ("already exists", "UNIQUE constraint failed", "duplicate key")


def heartbeat_s() -> int:
    """Seconds between a running trial's heartbeats (``SLIMKIT_HEARTBEAT_S``, whole seconds, at least 1)."""
    value = os.environ.get("SLIMKIT_HEARTBEAT_S", "")
    if not value:
        return HEARTBEAT_S
    if not value.isdigit() or int(value) < 1:
        raise SlimkitError(f"SLIMKIT_HEARTBEAT_S={value!r} is invalid", "use a whole number of seconds, 1 or more")
    return int(value)


def grace_s() -> int:
    """How long a trial's heartbeat may be silent before its worker is taken for dead."""
    return GRACE_HEARTBEATS * heartbeat_s()


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

    # ERROR: a trial failed by a stop or by another worker is reported here in one line, not as Optuna's traceback
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # Optuna 4.9 renamed the argument; slimkit[search] allows older versions that know the first name only.
    named = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in \
        inspect.signature(RDBStorage.__init__).parameters else "failed_trial_callback"
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat_s(), grace_period=grace_s(),
                              **{named: _retry_callback()})
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
    """Queue a dead worker's trial again, the same parameters without what that worker wrote (its
    name would mark the copy dead too; Optuna keeps the first constraints a trial is given). Optuna renamed the callback in 4.9; the old name works before."""
    from optuna import storages  # optional (optuna, extra 'search'): imported when used

    klass = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    retry = klass(max_retry=MAX_RETRY)

    def requeue(study: Any, trial: Any) -> None:
        clean = copy.deepcopy(trial)
        clean.user_attrs = {}
        clean.system_attrs = {k: v for k, v in clean.system_attrs.items() if not k.startswith("constraints")}
        retry(study, clean)

    return requeue


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def study_state(storage: Any, name: str) -> str:
    """``"missing"``, ``"incomplete"`` (a run was killed while creating it: no baseline stored, no
    trial finished) or ``"ready"``. The baseline is the last setting written, so its presence
    means the whole study, first guesses included, was written."""
    import optuna  # optional (optuna, extra 'search'): imported when used

    found = {s.study_name: s for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)}
    if name not in found:
        return "missing"
    return "ready" if READY_KEY in found[name].user_attrs else "incomplete"


def create_study(storage: Any, name: str, sampler: Any, attrs: dict[str, Any], *,
                 queue: Sequence[dict[str, Any]] = (), guesses: Sequence[dict[str, Any]] = ()) -> Any:
    """A new study holding ``attrs``, with ``queue`` (repeats kept) then ``guesses`` (repeats
    dropped) enqueued; ``attrs[READY_KEY]`` is written last. A study a killed run left incomplete
    is dropped first: nothing of it was measured."""
    import optuna  # optional (optuna, extra 'search'): imported when used

    state = study_state(storage, name)
    if state == "ready":
        raise SlimkitError(f"study {name!r} already exists in this storage",
                           "pass --resume to continue it, or choose another --out / --study")
    if state == "incomplete":
        log.warning("study %r was left half-created by a run that stopped; creating it again", name)
        optuna.delete_study(study_name=name, storage=storage)
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                directions=["minimize", "minimize", "minimize"])
    fault_point("study created")
    for key, value in attrs.items():
        if key != READY_KEY:
            study.set_user_attr(key, value)
    for params in queue:
        study.enqueue_trial(dict(params))
    for params in guesses:
        study.enqueue_trial(dict(params), skip_if_exists=True)
    study.set_user_attr(READY_KEY, attrs[READY_KEY])
    fault_point("study ready")
    return study


def load_study(storage: Any, name: str, sampler: Any) -> Any:
    import optuna  # optional (optuna, extra 'search'): imported when used

    if study_state(storage, name) != "ready":
        raise SlimkitError(f"there is no study {name!r} in this storage",
                           "start it with `slimkit optimize --storage URL --study NAME` first")
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler)


def worker_id() -> str:
    """``host:pid`` of this process, stored on every trial it takes."""
    return f"{socket.gethostname()}:{os.getpid()}"


def machine_id() -> str:
    """Which process-id space this process lives in: the host name, its boot and its pid namespace
    (two containers may share a host name, a rebooted machine reuses ids). Only a trial started
    under the same one is judged by whether its process id still exists."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if "boot" in path else str(os.stat(path).st_ino))
        except OSError:
            parts.append("?")
    return "/".join(parts)


def fail_dead_trials(study: Any) -> list[int]:
    """Fail the RUNNING trials whose process is gone and queue their parameters again; returns their numbers.

    Gone: its heartbeat is older than the grace period (Optuna's check, any machine); or it ran on
    this machine (:func:`machine_id`) under a process id that no longer exists (known at once, no
    grace needed); or it never got as far as naming its worker and started longer than the grace
    period ago.
    """
    import optuna  # optional (optuna, extra 'search'): imported when used
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    optuna.storages.fail_stale_trials(study)  # heartbeats; re-queued by the storage's callback
    now = datetime.datetime.now()
    here = machine_id()
    retry = _retry_callback()
    mine = []
    for t in running:
        who = t.user_attrs.get("worker")
        if who is None:
            dead = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace_s()
        else:
            dead = gone_here(t, here)
        if dead and _fail(study, t._trial_id):
            retry(study, study._storage.get_trial(t._trial_id))
            mine.append(t.number)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    gone = sorted(set(mine) | {t.number for t in running if states.get(t.number) == TrialState.FAIL})
    if gone:
        log.warning("trial(s) %s: their worker stopped; marked failed and queued again", gone)
    return gone


def gone_here(frozen: Any, here: str | None = None) -> bool:
    """Whether the process that took trial ``frozen`` ran on this machine and no longer exists."""
    pid = str(frozen.user_attrs.get("worker", "")).rpartition(":")[2]
    return frozen.user_attrs.get("machine") == (here or machine_id()) and pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fail(study: Any, trial_id: int) -> bool:
    """Mark one trial failed; False if another process finished or failed it first."""
    import optuna  # optional (optuna, extra 'search'): imported when used
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    try:
        return bool(study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def abandon(study: Any, trial_id: int | None) -> int | None:
    """This process stops (a signal): fail its trial if still running and queue it again; its number."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    if trial_id is None:
        return None
    frozen = study._storage.get_trial(trial_id)
    if frozen.state == TrialState.RUNNING:
        _fail(study, trial_id)
        frozen = study._storage.get_trial(trial_id)
    if frozen.state != TrialState.FAIL or any(frozen.number in t.system_attrs.get("retry_history", ())
                                              for t in study.get_trials(deepcopy=False)):
        return None  # finished, or failed and queued again by another process already
    _retry_callback()(study, frozen)
    return frozen.number


def finished(study: Any) -> int:
    """Trials that ended with a measurement (infeasible ones included)."""
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
