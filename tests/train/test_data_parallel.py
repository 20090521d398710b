"""Data-parallel training: 2 gloo processes under torchrun against one process on the same global batch.

Each multi-process case starts real torchrun jobs (``tests/train/_ddp_run.py``), one thread per
process. Tolerances: the same samples in the same order, summed in another order, give weights
within 1e-5 after 5 AdamW steps (measured: 3e-8 to 1e-6); the ranks themselves hold bit-identical
weights (DDP averages gradients before every rank takes the same step).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.train.data_parallel import launch_command, without_nproc

SCRIPT = Path(__file__).with_name("_ddp_run.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS, EVERY = 5, 2
#: max |w_2proc - w_1proc| after STEPS steps (float summation order only; measured 3e-8 to 1e-6).
SAME_BATCH_TOL = 1e-5


def _run(out: Path, mode: str, nproc: int, kill_at: int = 0, device: str = "cpu") -> int:
    args = [str(SCRIPT), str(out), mode, str(STEPS), str(EVERY), "1", str(kill_at), device]
    cmd = [sys.executable, *args] if nproc == 0 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=300).returncode


def _weights(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights{rank}.pt", map_location="cpu", weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["finetune", "qat", "distill"])
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path: Path, mode: str) -> None:
    assert _run(tmp_path / "one", mode, nproc=0) == 0
    assert _run(tmp_path / "two", mode, nproc=2) == 0
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "two")) <= SAME_BATCH_TOL
    assert _max_diff(_weights(tmp_path / "two", 0), _weights(tmp_path / "two", 1)) == 0.0
    # Only rank 0 wrote a checkpoint; rank 1's directory got none.
    assert list((tmp_path / "two" / "rank0").rglob("finetune.pt"))
    assert not list((tmp_path / "two").glob("rank1/**/finetune.pt"))


@pytest.mark.slow
def test_projection_outside_ddp_is_averaged(tmp_path: Path) -> None:
    """Feature KD's projection is no part of the DDP model: its gradients are averaged by hand, so
    both ranks end with the same student. (Against one process it is close, not equal: feature KD
    divides by the teacher feature's mean square over the slice, not the global batch.)"""
    assert _run(tmp_path / "two", "features", nproc=2) == 0
    assert _max_diff(_weights(tmp_path / "two", 0), _weights(tmp_path / "two", 1)) == 0.0


@pytest.mark.slow
def test_kill_of_a_rank_then_resume_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    assert _run(tmp_path / "full", "finetune", nproc=2) == 0
    # Rank 1 dies after step 3 (last checkpoint: step 2); torchrun stops rank 0 and fails.
    assert _run(tmp_path / "killed", "finetune", nproc=2, kill_at=3) != 0
    assert not (tmp_path / "killed" / "weights0.pt").exists()
    state = torch.load(tmp_path / "killed" / "rank0" / "finetune.pt", weights_only=True)
    assert state["step"] == 2
    # The same command again: rank 0 reads the checkpoint, rank 1 (no file of its own) gets it broadcast.
    assert _run(tmp_path / "killed", "finetune", nproc=2, kill_at=3) == 0
    assert _max_diff(_weights(tmp_path / "full"), _weights(tmp_path / "killed")) <= 1e-6


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_nccl_on_gpus_equals_one_process(tmp_path: Path) -> None:
    """One process per GPU (NCCL; with one GPU a one-process group still runs DDP over NCCL)."""
    nproc = min(2, torch.cuda.device_count())
    assert _run(tmp_path / "one", "finetune", nproc=0, device="cuda") == 0
    assert _run(tmp_path / "many", "finetune", nproc=nproc, device="cuda") == 0
    assert _max_diff(_weights(tmp_path / "one"), _weights(tmp_path / "many")) <= 1e-4


@pytest.mark.parametrize(("argv", "kept"), [
    (["--nproc", "2", "distill", "--steps", "4"], ["distill", "--steps", "4"]),
    (["distill", "--nproc=2", "--task", "digits"], ["distill", "--task", "digits"]),
    (["apply", "--step", "train.Finetune steps=3"], ["apply", "--step", "train.Finetune steps=3"]),
])
def test_nproc_is_removed_from_what_each_process_runs(argv: list[str], kept: list[str]) -> None:
    assert without_nproc(argv) == kept
    cmd = launch_command(kept, 3)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    assert cmd[-len(kept):] == kept


def test_bad_nproc_is_a_one_line_error() -> None:
    from typer.testing import CliRunner

    from slimkit.cli import app
    from slimkit.train.data_parallel import launch

    with pytest.raises(SlimkitError, match="--nproc 0 is invalid"):
        launch(["tasks"], 0)
    result = CliRunner().invoke(app, ["--nproc", "0", "distill"])
    assert result.exit_code == 2 and "--nproc 0 is invalid" in result.output
    result = CliRunner().invoke(app, ["--nproc", "2", "optimize"])
    assert result.exit_code == 2 and "--nproc applies to the commands that train" in result.output


@pytest.mark.slow
def test_cli_nproc_writes_out_from_rank_0_only(tmp_path: Path) -> None:
    """`slimkit --nproc 2 prune ... --finetune-steps 4`: two processes fine-tune; one --out, whole;
    the other rank's scratch directory is gone when the command ends."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "run"
    cmd = [sys.executable, "-c", "import sys; from slimkit.cli import main; sys.argv[0] = 'slimkit'; main()",
           "--nproc", "2", "prune", "--task", "digits", "--method", "magnitude", "--amount", "0.5",
           "--finetune-steps", "4", "--threads", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} >= {"model", "recipe.yaml", "report.html"}
    assert done.stdout.count("report ") == 1          # rank 1 printed nothing on stdout
    assert not list(scratch.glob("slimkit-rank*"))
