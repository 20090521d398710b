"""``slimkit --nproc N COMMAND ...``: run a command's training data-parallel on N local processes.

The command starts itself again under ``torchrun`` (``python -m torch.distributed.run --standalone
--nproc-per-node N``), waits, and exits with its exit code. Every process runs the same command, so
each takes every training step with the others (``slimkit.train.data_parallel``); rank 0 alone writes
``--out`` (model, recipe, report, checkpoints). The other ranks write into a scratch directory that
is removed when they finish, and print nothing on stdout.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from slimkit.core.errors import SlimkitError

#: Commands whose every step runs identically on each rank (a search's trials and time budget would not).
TRAINING_COMMANDS = ("quantize", "prune", "distill", "factorize", "apply")
NPROC = typer.Option(1, "--nproc", help="train on N local processes (torchrun; gloo on CPU, NCCL on CUDA); "
                     "rank 0 writes --out")


def relaunch(nproc: int, command: str | None) -> int:
    """Run this command line (without ``--nproc``) under torchrun with ``nproc`` processes; its exit code."""
    if nproc < 1:
        raise SlimkitError(f"--nproc {nproc} is invalid", "use 1 or more processes")
    if command not in TRAINING_COMMANDS:
        raise SlimkitError(f"--nproc applies to the commands that train ({', '.join(TRAINING_COMMANDS)}), "
                           f"not {command or 'no command'}", f"drop --nproc, or e.g. slimkit --nproc {nproc} distill ...")
    from slimkit.train.data_parallel import launch, without_nproc

    return launch(without_nproc(sys.argv[1:]), nproc)


def worker_out(kwargs: dict[str, Any]) -> None:
    """On ranks > 0 of a torchrun job: ``kwargs["out"]`` becomes a scratch directory (removed when the
    process exits) and stdout is silenced; elsewhere nothing changes."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0 or not isinstance(kwargs.get("out"), Path):
        return
    scratch = tempfile.mkdtemp(prefix=f"slimkit-rank{rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kwargs["out"] = Path(scratch) / "out"
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this worker process
