"""Two workers share one study on a real PostgreSQL server (installed by ``make test``, started on loopback, stopped)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
ARGS = ["--task", "digits", "--max-drop", "0.05", "--techniques", "magnitude,int8", "--threads", "1"]
TRIALS = 8


def _pg_bin() -> Path:
    if not PG_ROOT.is_dir() or not any(PG_ROOT.iterdir()):
        pytest.skip("PostgreSQL is not installed: `make test` installs Debian's postgresql package")
    return sorted(PG_ROOT.iterdir())[-1] / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """``postgresql://`` URL of a throw-away server on 127.0.0.1 (a fresh cluster, removed afterwards)."""
    pytest.importorskip("psycopg", reason="pip install 'slimkit[search]' brings the PostgreSQL driver")
    binary = _pg_bin()
    data = Path(tempfile.mkdtemp(prefix="slimkit-pg-"))  # outside pytest's 0700 tmp root: postgres must reach it
    port = _free_port()
    as_pg: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]

    def pg(*cmd: str) -> None:
        subprocess.run([*as_pg, *cmd], check=True, capture_output=True, timeout=120)

    pg(str(binary / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres")
    pg(str(binary / "pg_ctl"), "-D", str(data / "db"), "-l", str(data / "server.log"),
       "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {data}", "-w", "start")
    try:
        pg(str(binary / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "slimkit")
        yield f"postgresql://postgres@127.0.0.1:{port}/slimkit"
    finally:
        pg(str(binary / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from slimkit.cli.app import app; app()", *args]


def _namespaced_child(pid: int, timeout: float = 60) -> int:
    """The process ``unshare --fork`` started (its only child), by its id on this side."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("the worker in its own process namespace did not start")


@pytest.mark.slow
def test_optimize_and_two_workers_lose_no_trial_when_one_is_killed_mid_trial(postgres, tmp_path):
    """``slimkit optimize`` and two ``slimkit worker`` processes share one study on PostgreSQL. One
    worker runs in its own process-id namespace, so to the others it is another machine: once it is
    SIGKILLed in the middle of a trial, only Optuna's heartbeat can tell that it died. Every requested
    trial must finish exactly once (the killed one failed and re-run by a live process), and ``best/``
    must be the best trial's model."""
    import optuna

    import slimkit as sk
    from slimkit.search.study import machine_id

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "true"]).returncode != 0:
        pytest.skip("needs `unshare --pid` (root on Linux) to run a worker that looks like another machine")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMKIT_HEARTBEAT_S": "2"}  # dead after 8 silent seconds
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("main", "near", "far")}
    worker = _cli("worker", "--study", "shared", "--storage", postgres, "--wait", "300")
    procs = {"main": subprocess.Popen(_cli("optimize", *ARGS, "--trials", str(TRIALS), "--storage", postgres,
                                           "--study", "shared", "--out", str(tmp_path / "run")),
                                      env=env, stdout=logs["main"], stderr=subprocess.STDOUT),
             "near": subprocess.Popen(worker, env=env, stdout=logs["near"], stderr=subprocess.STDOUT),
             "far": subprocess.Popen(["unshare", "--pid", "--fork", *worker], env=env, stdout=logs["far"],
                                     stderr=subprocess.STDOUT)}
    said = lambda: {name: (tmp_path / f"{name}.log").read_text()[-1500:] for name in logs}  # noqa: E731
    try:
        far = _namespaced_child(procs["far"].pid)
        killed = None
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and procs["main"].poll() is None:
            try:
                running = optuna.load_study(study_name="shared", storage=postgres).get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            except KeyError:  # the study is not created yet
                running = []
            for t in running:
                if t.user_attrs.get("machine") not in (None, machine_id()):  # the far worker, inside a trial
                    os.kill(far, signal.SIGKILL)
                    killed = t.number
            time.sleep(0.1)
        assert killed is not None, said()
        procs["main"].wait(timeout=600)
        procs["near"].wait(timeout=120)
        procs["far"].wait(timeout=30)
    finally:
        for proc in procs.values():
            proc.kill()
    assert procs["main"].returncode == 0 and procs["near"].returncode == 0, said()
    assert procs["far"].returncode != 0  # killed

    trials = optuna.load_study(study_name="shared", storage=postgres).trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == TRIALS, said()                                 # none lost, none run past the count
    # nothing left running or waiting (PRUNED: taken once the count was already reached, stopped before measuring)
    assert {t.state.name for t in trials} <= {"COMPLETE", "FAIL", "PRUNED"}
    failed = [t.number for t in trials if t.state.name == "FAIL"]
    # the killed trial failed; a live one whose heartbeat a loaded machine delayed past the grace may have too
    assert killed in failed, said()
    for number in failed:                                              # each re-run exactly once
        redo = [t for t in done if t.system_attrs.get("failed_trial") == number]
        assert len(redo) == 1 and trials[number].params.items() <= redo[0].params.items(), number
    redo = next(t for t in done if t.system_attrs.get("failed_trial") == killed)
    assert redo.user_attrs["machine"] == machine_id()                  # by a live process on this side
    assert len({t.user_attrs["worker"] for t in done}) >= 2            # the work was shared

    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert sorted(t["number"] for t in result["trials"]) == sorted(t.number for t in done)
    best = min((t for t in result["trials"] if t["feasible"] and t["measured"]["score"] is not None),
               key=lambda t: (t["measured"]["drop"], t["measured"]["size_mb"], t["measured"]["latency_ms"], t["number"]))
    assert result["best"]["number"] == best["number"] and result["best_source"] == "incumbent", said()
    assert sk.io.read_meta(tmp_path / "run" / "best")["extra"]["trial"] == best["number"]


@pytest.mark.slow
def test_a_worker_killed_in_the_last_trial_is_replaced_and_the_result_holds_every_trial(postgres, tmp_path,
                                                                                       digits_task, one_thread):
    """One trial is done; a worker dies as it starts the last one (a real ``os._exit`` at a fault
    point, with the trial RUNNING). A resumed ``optimize`` and a new worker, started together, must
    both finish (the dead worker's trial failed, queued again and run by one of them), and the
    result must hold both trials, whichever process ran them."""
    import optuna

    import slimkit as sk
    from slimkit.search.faults import FAULT_EXIT

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = dict(target=sk.Target(max_drop=0.05, threads=1), technique_names=["magnitude", "int8"],
                    storage=postgres, study="last", out=tmp_path / "run", progress=False)
    sk.optimize(digits_task, trials=1, report=False, **settings)
    worker = _cli("worker", "--study", "last", "--storage", postgres, "--trials", "2")
    dying = subprocess.run(worker, env={**env, "SLIMKIT_FAULT_AT": "trial started@1"}, capture_output=True,
                           text=True, timeout=300)
    assert dying.returncode == FAULT_EXIT, dying.stdout[-1500:] + dying.stderr[-1500:]
    before = optuna.load_study(study_name="last", storage=postgres).trials
    assert [t.state.name for t in before[:2]] == ["COMPLETE", "RUNNING"]

    log = (tmp_path / "worker.log").open("w")
    other = subprocess.Popen(worker, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        result = sk.optimize(digits_task, trials=2, resume=True, **settings)
        other.wait(timeout=300)
    finally:
        other.kill()
    said = (tmp_path / "worker.log").read_text()
    assert other.returncode == 0 and "study last: 2 trials finished" in said, said  # it stayed for the last trial

    trials = optuna.load_study(study_name="last", storage=postgres).trials
    done = sorted(t.number for t in trials if t.state.name == "COMPLETE")
    assert len(done) == 2 and done[0] == 0
    assert [t.number for t in trials if t.state.name == "FAIL"] == [1]
    assert not [t for t in trials if t.state.name == "RUNNING"]
    redo = trials[done[1]]
    assert redo.system_attrs["failed_trial"] == 1 and before[1].params.items() <= redo.params.items()
    assert redo.user_attrs["worker"] != before[1].user_attrs["worker"]  # run by a live process, not the dead one
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert sorted(t["number"] for t in saved["trials"]) == done == sorted(t.number for t in result.trials)
