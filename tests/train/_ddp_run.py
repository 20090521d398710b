"""Train a tiny model as one rank of a torchrun job (or alone); each rank saves OUT/weightsR.pt.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/train/_ddp_run.py \
        OUT MODE STEPS EVERY KILL_RANK KILL_AT [DEVICE]

MODE: finetune, qat (int8 fake-quant layers, task loss), distill (logit KD, no kill), features
(distill with a feature pair: its projection trains outside DDP).
Checkpoints go to OUT/rankR (one directory per rank, so a test sees which rank wrote). With
KILL_AT > 0, rank KILL_RANK SIGKILLs itself after step KILL_AT unless OUT/killed exists (it
creates it first), so the second run of the same command resumes and finishes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests` importable when run as a script


def main(argv: list[str]) -> None:
    from slimkit.distill.distiller import Distill, distill
    from slimkit.quantize.qat import QAT, fold_and_freeze, prepare
    from slimkit.train import checkpointing, finetune
    from slimkit.train.data_parallel import rank
    from tests.models import mlp, tiny_task

    out, mode, steps, every, kill_rank, kill_at = Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), \
        int(argv[4]), int(argv[5])
    device = argv[6] if len(argv) > 6 else "cpu"
    torch.set_num_threads(1)
    task = tiny_task(mlp)  # no dropout: the same samples give the same numbers however they are split
    if device == "cuda":  # each rank on its own GPU (the loop moves the batches there)
        task.model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")

    def after_step(model: torch.nn.Module, step: int) -> None:
        marker = out / "killed"
        if kill_at and step == kill_at and rank() == kill_rank and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt = out / f"rank{rank()}"
    if mode in ("distill", "features"):  # a fresh student; a feature pair's projection trains outside DDP
        model = mlp()
        pairs = (("2", "2"),) if mode == "features" else ()
        with checkpointing(ckpt, every):
            distill(model, task, Distill(steps=steps, lr=1e-2, features=pairs), progress=False)
    elif mode == "qat":  # QAT's fake-quantized layers with their learned steps, on the labels
        model, _, _ = fold_and_freeze(task.model, QAT(loss="task"), task)
        prepare(model, QAT(loss="task"), task)
        finetune(model, task, steps=steps, lr=1e-2, seed=3, progress=False, checkpoint_dir=ckpt,
                 checkpoint_every=every)
    else:
        model = task.model
        finetune(model, task, steps=steps, lr=1e-2, seed=3, progress=False,
                 checkpoint_dir=ckpt, checkpoint_every=every, after_step=after_step)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / f"weights{rank()}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
