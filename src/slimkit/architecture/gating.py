"""Gated computation: a small model answers the inputs it is sure about, a large one the rest.

The router is the small model's own confidence (max softmax probability), calibrated on held-out
data like the early exits (``routing.calibrate``), so nothing extra is trained: any cheap model of
the same task (a NAS-found one, a pruned one) becomes the first stage. Per-sample routing inside a
batch: only the unsure rows are sent to the large model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from slimkit.architecture.routing import Routed, confidence


class Cascade(Routed):
    """``small`` first; samples whose confidence is not above ``thresholds[0]`` go to ``large``."""

    def __init__(self, small: nn.Module, large: nn.Module, threshold: float = 1.0) -> None:
        super().__init__(2)
        self.small, self.large = small, large
        self.set_thresholds([threshold])

    def exit_logits(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return [self.small(*inputs), self.large(*inputs)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, ...)
        threshold = float(self.thresholds[0])
        if threshold >= 1.0:  # the small model can never decide: skip it
            self.last_exits = torch.ones(x.shape[0], dtype=torch.long)
            return self.large(x)
        logits = self.small(x)  # (B, classes)
        unsure = confidence(logits) <= threshold
        self.last_exits = unsure.long()
        if bool(unsure.any()):
            logits = logits.clone()
            logits[unsure] = self.large(x[unsure])
        return logits
