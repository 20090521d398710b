"""A search killed with SIGKILL mid-trial resumes and loses at most the trial that was in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["--task", "digits", "--max-drop", "0.05", "--techniques", "magnitude,int8", "--threads", "1",
        "--trials", "4"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from slimkit.cli.app import app; app()", "optimize", *ARGS, "--out", str(out), *extra]


def _states(db: Path) -> dict[str, int]:
    """Trial counts by state, read-only: opening the study through Optuna would race the run creating its schema."""
    import sqlite3

    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    finally:
        con.close()
    return {str(state): int(n) for state, n in rows}


@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"  # the log sits beside it: slimkit refuses an --out that already holds files
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(_cli(out), env=env, stdout=log, stderr=subprocess.STDOUT)
    db = out / "study.db"
    deadline = time.monotonic() + 240
    killed_with: dict[str, int] = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            try:
                states = _states(db)
            except Exception:  # the study table may not exist yet
                states = {}
            if states.get("COMPLETE", 0) >= 1 and states.get("RUNNING", 0) == 1:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                killed_with = states
                break
        time.sleep(0.2)
    assert killed_with, f"not killed mid-trial; the run said: {(tmp_path / 'first.log').read_text()[-1500:]}"
    done_before = killed_with["COMPLETE"]
    after_kill = _states(db)
    assert after_kill.get("RUNNING") == 1 and after_kill.get("COMPLETE") >= done_before

    resumed = subprocess.run(_cli(out, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final = _states(db)
    assert final.get("COMPLETE") == 4          # the full count: nothing lost
    assert final.get("FAIL") == 1              # only the interrupted trial, and it was re-queued and re-run
    assert final.get("RUNNING", 0) == 0 and final.get("WAITING", 0) == 0
    assert (out / "report.html").is_file() and (out / "recipe.yaml").is_file()
