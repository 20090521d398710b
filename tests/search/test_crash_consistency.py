"""A search killed at any step (a deterministic fault point, not a timer) resumes to the full count,
every trial accounted for; SIGINT / SIGTERM stop it with one line and the trial re-queued.

The killed search runs in another process (the search's own code, a real ``os._exit`` or a real
signal; ``crash_child.py``); its candidates are measured by the deterministic fake of
``test_optimize`` so that what is tested is the study's bookkeeping, in about a second a step.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import tempfile
import sqlite3
from pathlib import Path

import pytest

import slimkit as sk
from slimkit.search.faults import FAULT_EXIT, STEPS
from slimkit.search.optimize import optimize
from tests.search.test_optimize import FakeMeasurer

TRIALS = 3
TARGET = sk.Target(max_size_mb=0.3, max_drop=0.01)
TECHNIQUES = ["int8", "weight_only"]
STOPPED = 2  # crash_child's exit status when the search raised its one-line error


@pytest.fixture(scope="module")
def fork_server():
    """Children forked from a server that imported slimkit and loaded digits single-threaded (fast, fork-safe)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.search.crash_child"])
    return ctx


@pytest.fixture
def run_dir(tmp_path):
    """A run directory in memory where there is one: what is tested is the order of the writes, not the
    disk, and SQLite's syncs on a busy disk would make up most of the test's time."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    out = Path(tempfile.mkdtemp(prefix="slimkit-crash-", dir=shm))
    yield out
    shutil.rmtree(out, ignore_errors=True)


def _child(settings: dict, fault: str, signal_name: str | None) -> None:
    from tests.search.crash_child import search  # already imported by the server

    search(settings, fault, signal_name)


def _killed_at(server, out: Path, fault: str, signal_name: str | None = None, resume: bool = False) -> int:
    settings = dict(target=TARGET, trials=TRIALS, out=out, technique_names=TECHNIQUES, resume=resume)
    child = server.Process(target=_child, args=(settings, fault, signal_name))
    child.start()
    child.join(timeout=120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode is not None, "the search did not end"
    return child.exitcode


def _states(out: Path) -> dict[str, int]:
    con = sqlite3.connect(out / "study.db")
    try:
        rows = con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    finally:
        con.close()
    return {str(state): int(n) for state, n in rows}


def _resumed_to_the_full_count(task, out: Path) -> dict[str, int]:
    result = optimize(task, TARGET, trials=TRIALS, out=out, measurer=FakeMeasurer(), technique_names=TECHNIQUES,
                      progress=False, report=False, resume=True)
    states = _states(out)
    assert states.get("COMPLETE") == TRIALS and states.get("RUNNING", 0) == 0 and states.get("WAITING", 0) == 0
    saved = json.loads((out / "result.json").read_text())
    assert sorted(t["number"] for t in saved["trials"]) == sorted(t.number for t in result.trials)
    assert len(result.trials) == TRIALS and result.best is not None and (out / "best").is_dir()
    return states


# (fault point, trials failed when it is over: the one in flight, failed and run again)
KILLS = [("baseline measured", 0), ("study created", 0), ("study ready", 0), ("trial started@1", 1),
         ("trial measured@1", 1), ("trial told@1", 0), ("trials done", 0), ("best saved", 0), ("result written", 0)]


def test_every_fault_point_is_in_the_table():
    assert sorted({f.split("@")[0] for f, _ in KILLS}) == sorted(STEPS)


@pytest.mark.parametrize("fault,failed", KILLS, ids=[f for f, _ in KILLS])
def test_a_search_killed_at_each_step_resumes_to_the_full_count(fork_server, digits_task, run_dir, fault, failed):
    assert _killed_at(fork_server, run_dir, fault) == FAULT_EXIT
    assert not (run_dir / "said.txt").exists()
    states = _resumed_to_the_full_count(digits_task, run_dir)
    assert states.get("FAIL", 0) == failed


def test_a_resume_killed_again_still_resumes(fork_server, digits_task, run_dir):
    assert _killed_at(fork_server, run_dir, "trial started@1") == FAULT_EXIT
    assert _killed_at(fork_server, run_dir, "trial measured", resume=True) == FAULT_EXIT
    assert _resumed_to_the_full_count(digits_task, run_dir).get("FAIL") == 2


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_signal_fails_the_trial_requeues_it_and_says_how_to_resume(fork_server, digits_task, run_dir,
                                                                   signal_name):
    assert _killed_at(fork_server, run_dir, "trial started@1", signal_name) == STOPPED
    assert (run_dir / "said.txt").read_text() == (
        f"search stopped by {signal_name} with 1 of {TRIALS} trials finished; trial 1 marked failed and queued "
        f"again — continue with the same command plus --resume (run directory {run_dir}, study slimkit-digits)")
    import optuna

    trials = optuna.load_study(study_name="slimkit-digits", storage=f"sqlite:///{run_dir / 'study.db'}").trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [1] and sum(t.state.name == "COMPLETE" for t in trials) == 1
    assert not any(t.state.name == "RUNNING" for t in trials)
    assert [t.params for t in trials if t.system_attrs.get("failed_trial") == 1] == [failed[0].params]  # queued again
    assert _resumed_to_the_full_count(digits_task, run_dir).get("FAIL") == 1
