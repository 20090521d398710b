"""Memory layout of a float conv net on the CPU: NCHW as trained, or channels-last (NHWC) when it runs faster.

oneDNN's CPU convolutions are blocked over channels; in NHWC they skip the reorders NCHW needs
around every conv. Measured on a ResNet-18 pruned to half its MACs (batch 8x224x224, 2 threads):
1.83x the original in NCHW, 2.46x in NHWC (the original itself gains 1.18x). Tiny nets can lose,
so the layout is chosen by timing both on the example, never assumed.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import torch
import torch.nn as nn

from slimkit.measure.latency import median_call_ms

log = logging.getLogger("slimkit.runtime")

#: Channels-last must win by this much to be kept (timing noise on a shared machine).
MARGIN = 0.05
#: Smallest input feature map (H x W) worth timing: below it the reorders cost little and
#: sub-millisecond timings would pick a layout by noise.
MIN_PIXELS = 56 * 56


class ChannelsLast(nn.Module):
    """``model`` with channels-last weights; 4-D float inputs are converted on the way in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, *inputs: Any) -> Any:
        moved = [x.contiguous(memory_format=torch.channels_last)
                 if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() else x for x in inputs]
        return self.model(*moved)


def has_float_convs(model: nn.Module) -> bool:
    return any(type(m) is nn.Conv2d for m in model.modules())


def fastest_layout(model: nn.Module, example: Sequence[torch.Tensor], *, threads: int | None = None,
                   runs: int = 5) -> tuple[nn.Module, str, dict[str, float]]:
    """``model`` or its channels-last copy, whichever is faster on ``example`` (ms per layout alongside)."""
    images = [x for x in example if isinstance(x, torch.Tensor) and x.dim() == 4]
    if not has_float_convs(model) or not images or max(x.shape[-2] * x.shape[-1] for x in images) < MIN_PIXELS:
        return model, "contiguous", {}
    candidates = {"contiguous": model.eval(), "channels_last": ChannelsLast(model).eval()}
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for m in candidates.values():  # warm-up: first calls pick algorithms and allocate
                m(*example)
            ms = {name: [] for name in candidates}
            for _ in range(2):  # interleaved, so a busy moment hits both
                for name, m in candidates.items():
                    ms[name].append(median_call_ms(lambda m=m: m(*example), runs))
    finally:
        torch.set_num_threads(previous)
    best = {name: min(v) for name, v in ms.items()}
    choice = "channels_last" if best["channels_last"] < best["contiguous"] * (1 - MARGIN) else "contiguous"
    log.info("layout %s (%.3g ms vs %.3g ms contiguous)", choice, best["channels_last"], best["contiguous"])
    return candidates[choice], choice, best
