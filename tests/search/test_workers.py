"""Two workers share one study on a real PostgreSQL server (installed by ``make test``, started on loopback, stopped)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
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


@pytest.mark.slow
def test_two_workers_share_one_study(postgres, tmp_path):
    import optuna

    import slimkit as sk

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = {name: (tmp_path / f"{name}.log").open("w") for name in ("main", "worker")}
    main = subprocess.Popen(_cli("optimize", *ARGS, "--trials", str(TRIALS), "--storage", postgres,
                                 "--study", "shared", "--out", str(tmp_path / "run")),
                            env=env, stdout=logs["main"], stderr=subprocess.STDOUT)
    other = subprocess.Popen(_cli("worker", "--study", "shared", "--storage", postgres, "--wait", "300"),
                             env=env, stdout=logs["worker"], stderr=subprocess.STDOUT)
    try:
        main.wait(timeout=600)
        other.wait(timeout=120)
    finally:
        for proc in (main, other):
            proc.kill()
    said = {name: (tmp_path / f"{name}.log").read_text()[-1500:] for name in logs}
    assert main.returncode == 0 and other.returncode == 0, said

    study = optuna.load_study(study_name="shared", storage=postgres)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == TRIALS, said                                 # none lost, none run past the count
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}  # nothing left running or failed
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({t.user_attrs["worker"] for t in done}) == 2          # both processes took trials
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert len(result["trials"]) == TRIALS and result["best"] is not None
    # whichever process ran the best trial saved it (one machine, one run directory): best/ is that copy
    assert result["best_source"] == "incumbent", said
    incumbent = sk.io.read_meta(tmp_path / "run" / "incumbent")["extra"]["incumbent"]
    best_meta = sk.io.read_meta(tmp_path / "run" / "best")
    assert incumbent["trial"] == result["best"]["number"] == best_meta["extra"]["trial"]

    # The same trials (same parameters, in order) in one process give the same best: the same metric and
    # bytes, and the same pipeline unless several pipelines tie on both (then latency, a noisy measurement, decides).
    params = [dict(t.params) for t in sorted(done, key=lambda t: t.number)]
    single = sk.optimize("digits", sk.Target(max_drop=0.05, threads=1), trials=TRIALS,
                         technique_names=["magnitude", "int8"], out=tmp_path / "single", enqueue=params,
                         progress=False, report=False)
    best = result["best"]["measured"]
    assert single.best is not None
    assert [r.params for r in sorted(single.trials, key=lambda r: r.number)] == params
    assert single.best.measured.score == pytest.approx(best["score"], abs=1e-9)
    assert single.best.measured.size_mb == pytest.approx(best["size_mb"], rel=1e-6)
    ties = [t["recipe"] for t in result["trials"] if t["feasible"] and t["measured"]["drop"] == best["drop"]
            and t["measured"]["size_mb"] == best["size_mb"]]
    assert single.best.recipe in ties


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
