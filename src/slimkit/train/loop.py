"""A deliberately small, deterministic training loop with a progress bar.

Deterministic means: same seed, same data, same thread count -> same weights. Shuffling uses
its own ``torch.Generator`` so it does not depend on (or disturb) the global RNG.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.errors import SlimkitError
from slimkit.core.progress import progress_bar

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclasses.dataclass
class FitResult:
    epochs: int
    losses: list[float]  # mean training loss per epoch


def fit(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float = 1e-3,
        batch_size: int = 64, weight_decay: float = 0.0, seed: int = 0, augment: Augment | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        label: str = "training", progress: bool = True) -> FitResult:
    """Train ``model`` in place with AdamW and a cosine learning-rate schedule.

    ``inputs`` (N, ...) and ``labels`` (N,) are whole tensors: the zoo's data sets fit in memory,
    and indexing tensors is faster than a DataLoader on two cores.
    """
    if inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
        raise SlimkitError(f"{label}: {inputs.shape[0]} inputs but {labels.shape[0]} labels",
                           "give one label per input")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(inputs.shape[0] / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15, anneal_strategy="cos")
    losses: list[float] = []
    model.train()
    with progress_bar(progress) as bar:
        task_id = bar.add_task(label, total=epochs * steps_per_epoch, info="") if bar else None
        for _ in range(epochs):
            order = torch.randperm(inputs.shape[0], generator=gen)
            total = 0.0
            for start in range(0, inputs.shape[0], batch_size):
                idx = order[start:start + batch_size]
                x, y = inputs[idx], labels[idx]
                if augment is not None:
                    x = augment(x, gen)
                loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise SlimkitError(f"{label}: loss became {loss.item()}", "lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * idx.numel()
                if bar:
                    bar.advance(task_id)
            losses.append(total / inputs.shape[0])
    model.eval()
    return FitResult(epochs=epochs, losses=losses)

