"""Taking trials from a shared study until it has its count, whichever processes run them.

``slimkit optimize`` and every ``slimkit worker`` run the same loop: before each trial, trials
whose process died are failed and queued again (:func:`slimkit.search.study.fail_dead_trials`);
when the last trials run elsewhere, the loop waits for them, bounded and saying so, and takes
over the ones whose worker turns out to be dead. It returns only when the study has the count
(or time or the wait ran out), so a result read afterwards holds every finished trial.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from slimkit.search.budget import TimeBudget, enough_for_another
from slimkit.search.faults import fault_point
from slimkit.search.interrupt import Interrupted
from slimkit.search.study import abandon, fail_dead_trials, grace_s, machine_id, worker_id

log = logging.getLogger("slimkit.search")

POLL_S = 1.0
#: Waiting for trials other workers run ends after this long, or 3x the slowest trial so far if longer.
WAIT_FLOOR_S = 600.0
#: Words of Optuna's refusals to record a trial that is no longer running.
TOLD_TOO_LATE = {"tell", "reach."}


class Finished(int):
    """How many trials the study has finished (an ``int``), and ``reason``: why this process stopped taking more."""

    reason: str

    def __new__(cls, done: int, reason: str) -> "Finished":
        out = super().__new__(cls, done)
        out.reason = reason
        return out


class TakenOver(Exception):
    """This process's trial was failed by another (its heartbeat came late) and queued again."""


def run_trials(study: Any, objective: Callable[[Any], Any], n_trials: int, *, budget: TimeBudget | None = None,
               reserve_s: float = 0.0, on_trial: Callable[[Any], None] | None = None,
               wait_s: float | None = None) -> Finished:
    """Take trials until ``n_trials`` have finished study-wide or time is up; returns how many finished,
    with the reason it stopped (the count, the time budget, the wait for other workers).

    One trial per ``optimize`` call, so the count is re-read from the database before each trial:
    two workers never overshoot by more than the trial each has in flight. A trial starts only when
    one as slow as the slowest so far still ends before ``budget`` less ``reserve_s``. Trials other
    workers run are waited for up to ``wait_s`` (default: :data:`WAIT_FLOOR_S` or 3x the slowest
    trial, plus the heartbeat grace), never past ``budget`` less ``reserve_s``. A stopping signal
    fails and re-queues this process's trial and raises :class:`~slimkit.search.interrupt.Interrupted`
    with its number.
    """
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    budget = budget or TimeBudget(None)
    current: dict[str, Any] = {}

    def told(_study: Any, trial: Any) -> None:
        fault_point("trial told", trial.number)
        if on_trial is not None:
            on_trial(trial)

    guarded = _within_count(objective, n_trials, current)
    waiting_since, limit = None, 0.0
    try:
        while True:
            current.clear()
            fail_dead_trials(study)
            trials = study.get_trials(deepcopy=False)
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING]
            seconds = [t.user_attrs["measured"].get("seconds", 0.0) for t in done if "measured" in t.user_attrs]
            if len(done) >= n_trials:
                return Finished(len(done), f"trials done: {len(done)} of {n_trials} finished")
            if len(done) + len(running) >= n_trials:  # the last trials run elsewhere: wait for them
                if waiting_since is None:
                    waiting_since = time.monotonic()
                    limit = wait_s if wait_s is not None else \
                        max(WAIT_FLOOR_S, 3 * max(seconds, default=0.0)) + grace_s()
                    left = budget.left()
                    if left is not None:  # the time budget bounds the wait too
                        limit = max(0.0, min(limit, left - reserve_s))
                    log.warning("%d of %d trials finished; waiting up to %.0f s for %s", len(done), n_trials,
                                limit, _describe(running))
                elif time.monotonic() - waiting_since > limit:
                    log.warning("stopped waiting after %.0f s for %s; the result holds the %d finished trials "
                                "(run with --resume once they end to include them)", limit, _describe(running),
                                len(done))
                    return Finished(len(done), f"stopped waiting {limit:.0f} s for {len(running)} trial(s) "
                                               f"running elsewhere: {len(done)} of {n_trials} finished")
                time.sleep(POLL_S)
                continue
            waiting_since = None
            if not enough_for_another(seconds, budget.left(), reserve_s):
                return Finished(len(done), f"time budget reached: {len(done)} of {n_trials} trials finished in "
                                           f"{budget.elapsed():.0f} s of {budget.seconds:g} s (another trial as "
                                           f"slow as the slowest, {max(seconds, default=0.0):.0f} s, and the "
                                           f"{reserve_s:.0f} s kept for the end would not fit)")
            try:
                study.optimize(guarded, n_trials=1, catch=(), gc_after_trial=True, callbacks=[told])
            except (ValueError, AssertionError) as exc:
                # Optuna refuses to record a trial another process failed in the meantime (its heartbeat
                # came late: "Cannot tell a FAIL trial", or its own assertion when that happens after
                # the objective returned); that process queued it again, so only this measurement is lost.
                if not (TOLD_TOO_LATE & set(str(exc).split())) or not _failed_elsewhere(study, current):
                    raise
                log.warning("trial %s was taken for dead by another worker and queued again; its measurement "
                            "here is dropped", current.get("number"))
    except KeyboardInterrupt as exc:
        number = abandon(study, current.get("id"))
        raise Interrupted(getattr(exc, "signal_name", "SIGINT"), number) from None


def _describe(running: list[Any]) -> str:
    return ", ".join(f"trial {t.number} ({t.user_attrs.get('worker', 'worker not known yet')})" for t in running)


def _failed_elsewhere(study: Any, current: dict[str, Any]) -> bool:
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    """Whether this process's trial was failed by another: only then does recording it raise."""
    return "id" in current and study._storage.get_trial(current["id"]).state == TrialState.FAIL


def _within_count(objective: Callable[[Any], Any], n_trials: int, current: dict[str, Any]) -> Callable[[Any], Any]:
    """Name this process on the trial; prune a trial that two workers started at once past the count
    (trial numbers decide who goes on); refuse to report a trial another process took over."""
    import optuna  # optional (optuna, extra 'search'): imported when used
    from optuna.trial import TrialState  # optional (optuna, extra 'search'): imported when used

    def guarded(trial: Any) -> Any:
        current.update(id=trial._trial_id, number=trial.number)
        trial.set_user_attr("machine", machine_id())
        trial.set_user_attr("worker", worker_id())
        fault_point("trial started", trial.number)
        ahead = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        if sum(t.number < trial.number for t in ahead) >= n_trials:
            raise optuna.TrialPruned(f"the study already has {n_trials} trials")
        values = objective(trial)
        if trial.study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
            raise TakenOver(f"trial {trial.number} was failed by another worker")
        return values

    return guarded
