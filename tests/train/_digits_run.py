"""Fine-tune a damaged copy of the digits model; run as a script so a test can SIGKILL it mid-run.

    python -m tests.train._digits_run CHECKPOINT_DIR STEPS EVERY THREADS SLEEP_S
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn as nn

SETTINGS = {"lr": 1e-3, "seed": 3, "eval_every": 20, "progress": False}


def damaged(model: nn.Module, scale: float = 1.0, seed: int = 1) -> nn.Module:
    """A copy of ``model`` with Gaussian noise of ``scale`` x each weight tensor's std added."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return model


def main(argv: list[str]) -> None:
    from slimkit import zoo
    from slimkit.train import finetune

    directory, steps, every, threads, pause = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    torch.set_num_threads(threads)
    task = zoo.load("digits")
    finetune(damaged(task.model), task, steps=steps, checkpoint_dir=directory, checkpoint_every=every,
             after_step=lambda model, step: time.sleep(pause), **SETTINGS)


if __name__ == "__main__":
    main(sys.argv[1:])
