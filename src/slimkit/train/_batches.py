"""An endless, reproducible stream of training batches drawn from ``task.train``.

``task.train`` items are ``((inputs...), labels)`` for labelled tasks or plain input tuples for
unlabelled ones (labels are then ``None``). When every batch holds same-shaped tensors the
samples are pooled and reshuffled across batches each pass (better SGD than a fixed batch
composition); otherwise (e.g. token batches of different lengths) the batch order is shuffled.
The shuffle uses its own ``torch.Generator``, so it neither depends on nor disturbs global RNG,
and its whole position is a small state dict for exact resumption.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from slimkit.core.errors import SlimkitError
from slimkit.core.task import Inputs, split_item


class BatchStream:
    """``next()`` gives the next (inputs, labels) batch, cycling over passes forever."""

    def __init__(self, train: Iterable[Any] | None, seed: int, name: str = "task") -> None:
        items = [split_item(it) for it in (train or [])]
        if not items:
            raise SlimkitError(f"task {name!r} has no training data",
                               "give the Task train=[((inputs,), labels), ...] batches to fine-tune on")
        self.items = items
        self.gen = torch.Generator().manual_seed(seed)
        self.pooled = _pool(items)
        self.order: torch.Tensor | None = None
        self.pos = 0

    def __len__(self) -> int:
        """Batches per pass."""
        if self.pooled is None:
            return len(self.items)
        n, size = self.pooled[2], self.pooled[3]
        return max(1, n // size)

    def next(self) -> tuple[Inputs, Any]:
        if self.order is None or self.pos >= len(self):
            n = len(self.items) if self.pooled is None else self.pooled[2]
            self.order, self.pos = torch.randperm(n, generator=self.gen), 0
        k, self.pos = self.pos, self.pos + 1
        if self.pooled is None:
            return self.items[int(self.order[k])]
        inputs, labels, n, size = self.pooled
        # Full batches only (a trailing batch of one sample breaks BatchNorm); the next pass
        # reshuffles, so every sample keeps being seen.
        idx = self.order[k * size:(k + 1) * size] if n >= size else self.order
        return tuple(x[idx] for x in inputs), (None if labels is None else labels[idx])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])
        self.order, self.pos = state["order"], int(state["pos"])


def _pool(items: list[tuple[Inputs, Any]]) -> tuple[Inputs, Any, int, int] | None:
    """All samples as one tensor per input (and labels), or None when batches do not line up."""
    first_inputs, first_labels = items[0]
    size = _batch_size(first_inputs, first_labels)
    if size is None or len(items) < 2:
        return None

    def signature(inputs: Inputs, labels: Any) -> tuple:
        parts = list(inputs) + ([] if labels is None else [labels])
        return tuple((p.dtype, p.device, tuple(p.shape[1:])) for p in parts)

    sig = signature(first_inputs, first_labels)
    for inputs, labels in items:
        if (labels is None) != (first_labels is None) or _batch_size(inputs, labels) is None \
                or signature(inputs, labels) != sig:
            return None
    cols = [torch.cat([inputs[i] for inputs, _ in items]) for i in range(len(first_inputs))]
    labels = None if first_labels is None else torch.cat([lab for _, lab in items])
    return tuple(cols), labels, int(cols[0].shape[0]), size


def _batch_size(inputs: Inputs, labels: Any) -> int | None:
    """The shared leading dimension of every tensor in a batch, or None if there is none."""
    parts = list(inputs) + ([] if labels is None else [labels])
    if not parts or not all(isinstance(p, torch.Tensor) and p.dim() >= 1 for p in parts):
        return None
    sizes = {int(p.shape[0]) for p in parts}
    return sizes.pop() if len(sizes) == 1 and 0 not in sizes else None
