"""Data-parallel recovery training: the same ``finetune`` loop on N processes started by ``torchrun``.

Run any script or ``slimkit`` command that trains under ``torchrun --nproc-per-node N`` (or give the
command ``--nproc N``) and every ``finetune`` call (fine-tuning, ``Distill``, QAT) trains with
``DistributedDataParallel``: gloo on CPU, NCCL when the model is on CUDA (each process then uses
``cuda:LOCAL_RANK``). Why it reproduces a single-process run on the same global batch:

- every rank builds the same seeded ``BatchStream`` (same order, same global batches) and takes its
  contiguous slice of each global batch of B samples (B/N each; B must divide by N);
- each rank's loss is the mean over its slice and DDP averages gradients over ranks, so the step is
  the step on the mean over all B samples (exact up to float summation order);
- DDP broadcasts rank 0's weights when it wraps the model, so every rank starts from the same point.

What does not carry over exactly: randomness inside the forward (dropout draws other masks on a
slice than on the whole batch), BatchNorm statistics (per slice; not synced) and losses that couple
samples (relational KD's Gram matrix is then per slice).

Only rank 0 writes checkpoints; on resume rank 0 reads the checkpoint and broadcasts it, so ranks
need no shared file system. A killed rank makes ``torchrun`` stop the others; running the same
command again (or ``torchrun --max-restarts K``) continues from the last checkpoint.
"""

from __future__ import annotations

import atexit
import datetime
import os
import subprocess
import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Inputs

#: How long a rank waits for the others at a collective before failing (a dead peer, a stuck step).
TIMEOUT = datetime.timedelta(minutes=30)


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE`` set by torchrun; 1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    """True on the process that writes checkpoints, artifacts and reports (rank 0, or the only one)."""
    return rank() == 0


def distributed() -> bool:
    """True in a process torchrun started (even alone: one GPU then still trains through NCCL + DDP)."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def _init(cuda: bool) -> None:
    """Join the process group once per process: NCCL for CUDA models, gloo on CPU."""
    if dist.is_initialized():
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(_leave)  # NCCL warns at exit about a group never destroyed


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class DataParallel:
    """One ``finetune`` run's view of the process group: the DDP-wrapped model and what the loop needs."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter]) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = any(p.device.type == "cuda" for p in model.parameters())
        _init(cuda)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        if cuda:
            model.to(self.device)  # parameters keep their identity: `trainable` still points at them
        self.module = DDP(model, device_ids=[self.device.index] if cuda else None, find_unused_parameters=True)
        in_model = {id(p) for p in model.parameters()}
        # Trained but outside the model (distillation projections): DDP does not see them, we average them.
        self.extra = [p for p in trainable if id(p) not in in_model]

    def shard(self, inputs: Inputs, labels: Any) -> tuple[Inputs, Any]:
        """This rank's contiguous slice of a global batch: samples [r*B/N, (r+1)*B/N)."""
        size = _leading(inputs, labels)
        if size % self.world:
            raise SlimkitError(f"a training batch of {size} samples does not split over {self.world} processes",
                               f"use a batch size that is a multiple of {self.world}, or another --nproc")
        per = size // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per

        def cut(x: Any) -> Any:
            return x[lo:hi] if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == size else x

        return tuple(cut(x) for x in inputs), cut(labels)

    def sync_extra_grads(self) -> None:
        """Average the gradients of trained parameters outside the DDP model (DDP did the rest)."""
        for p in self.extra:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def mean(self, value: torch.Tensor) -> float:
        """The loss over the whole global batch: the mean of the ranks' slice means."""
        total = value.detach().reshape(1).to(self.device, torch.float64)
        dist.all_reduce(total)
        return float(total.item()) / self.world

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a checkpoint read by rank 0 alone, a yes/no it decided)."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def session(model: nn.Module, trainable: list[nn.Parameter]) -> DataParallel | None:
    """A :class:`DataParallel` when torchrun started this process, else None (plain training)."""
    return DataParallel(model, trainable) if distributed() else None


def _leading(inputs: Inputs, labels: Any) -> int:
    parts = [x for x in (*inputs, labels) if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not parts:
        raise SlimkitError("a training batch holds no tensor with a batch dimension to split over processes",
                           "give the Task train batches of tensors, or train in one process")
    return int(parts[0].shape[0])


def launch_command(argv: Sequence[str], nproc: int) -> list[str]:
    """The command line that runs ``slimkit ARGV`` on ``nproc`` local processes under torchrun."""
    script = "import sys; from slimkit.cli import main; sys.argv[0] = 'slimkit'; main()"
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--no-python", sys.executable, "-c", script, *argv]


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``slimkit ARGV`` under torchrun with ``nproc`` processes; wait and return its exit code."""
    if nproc < 1:
        raise SlimkitError(f"--nproc {nproc} is invalid", "use 1 or more processes")
    return subprocess.run(launch_command(argv, nproc), check=False).returncode


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` with its ``--nproc N`` / ``--nproc=N`` removed (what each launched process runs)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
