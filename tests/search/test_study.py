"""The study storage: opened by several processes at once; trials whose worker died found, failed and
queued again, each as soon as that can be known; waiting for live workers bounded and said."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest


def _open_and_count(url: str, queue: "mp.Queue[int | str]") -> None:
    try:
        from slimkit.search.study import open_storage

        storage = open_storage(url)
        queue.put(len(storage.get_all_studies()))
    except Exception as exc:  # reported to the parent, which asserts on it
        queue.put(f"{type(exc).__name__}: {exc}")


def test_simultaneous_first_open_does_not_fail(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ctx = mp.get_context("spawn")
    queue: "mp.Queue[int | str]" = ctx.Queue()
    procs = [ctx.Process(target=_open_and_count, args=(url, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert results == [0, 0, 0, 0], results
    assert all(p.exitcode == 0 for p in procs)


def _study(tmp_path: Path, monkeypatch):
    import optuna

    from slimkit.search.study import open_storage

    monkeypatch.setenv("SLIMKIT_HEARTBEAT_S", "1")  # grace: 4 s
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(storage=storage, study_name="s", directions=["minimize"]), storage


def _running(study, storage, worker: str | None, machine: str | None, heartbeat: bool, x: float):
    import optuna

    study.enqueue_trial({"x": x})
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    if worker is not None:
        trial.set_user_attr("machine", machine)
        trial.set_user_attr("worker", worker)
    if heartbeat:
        storage.record_heartbeat(trial._trial_id)
    return trial


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked by hand, heartbeats recorded by hand
def test_dead_trials_are_failed_and_queued_again_each_as_soon_as_it_can_be_known(tmp_path, monkeypatch):
    import subprocess
    import time

    from slimkit.search.study import fail_dead_trials, machine_id, worker_id

    study, storage = _study(tmp_path, monkeypatch)
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process id of this machine that no longer runs
    here = worker_id().rpartition(":")[0]
    _running(study, storage, f"{here}:{gone.pid}", machine_id(), True, 0.1)     # 0: this machine, process gone
    _running(study, storage, f"{here}:{os.getpid()}", machine_id(), True, 0.2)  # 1: this machine, alive
    _running(study, storage, "elsewhere:1", "elsewhere", True, 0.3)             # 2: another machine: heartbeat
    _running(study, storage, "elsewhere:2", f"{machine_id()}-not", False, 0.4)  # 3: no heartbeat: waited for
    _running(study, storage, None, None, False, 0.5)                            # 4: died before naming itself
    assert fail_dead_trials(study) == [0]
    time.sleep(5)  # past the grace period; trial 1's process keeps beating
    storage.record_heartbeat(study.trials[1]._trial_id)
    assert fail_dead_trials(study) == [2, 4]
    states = {t.number: t.state.name for t in study.trials}
    assert states == {0: "FAIL", 1: "RUNNING", 2: "FAIL", 3: "RUNNING", 4: "FAIL",
                      5: "WAITING", 6: "WAITING", 7: "WAITING"}
    copies = {t.system_attrs["failed_trial"]: t for t in study.trials if t.state.name == "WAITING"}
    assert {n: c.params["x"] for n, c in copies.items()} == {0: 0.1, 2: 0.3, 4: 0.5}
    assert all(c.user_attrs == {} for c in copies.values())  # the dead worker's name is not copied


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_waiting_for_trials_running_elsewhere_is_bounded_and_said(tmp_path, monkeypatch, caplog):
    from slimkit.search.study import machine_id
    from slimkit.search.trial_loop import run_trials

    study, storage = _study(tmp_path, monkeypatch)
    _running(study, storage, "elsewhere:7", f"{machine_id()}-not", False, 0.5)  # alive as far as anyone can tell
    with caplog.at_level(logging.WARNING, logger="slimkit.search"):
        finished = run_trials(study, lambda trial: 0.0, 1, wait_s=2.0)
    assert finished == 0 and [t.state.name for t in study.trials] == ["RUNNING"]  # never taken over, never run twice
    said = [r.getMessage() for r in caplog.records]
    assert said == ["0 of 1 trials finished; waiting up to 2 s for trial 0 (elsewhere:7)",
                    "stopped waiting after 2 s for trial 0 (elsewhere:7); the result holds the 0 finished trials "
                    "(run with --resume once they end to include them)"]
