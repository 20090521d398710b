"""The stored forms of factorized layers: each is a short sequence of ordinary, smaller layers.

``LowRankLinear`` / ``LowRankConv2d`` (truncated SVD), ``TuckerConv2d`` (1x1 -> kxk -> 1x1) and
``CPConv2d`` (1x1 -> kx1 depthwise -> 1xk depthwise -> 1x1). Their parameters really are smaller
(the saved artifact and the MACs shrink), every piece runs on torch's own dense kernels, and each
class is registered with ``spec()`` / ``empty(spec)`` so ``slimkit.load`` rebuilds the same
structure from an artifact before loading its tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from slimkit.core.registry import layer_class


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """The JSON-able shape arguments of a Conv2d (what every factorized conv's spec repeats)."""
    return {"in_channels": conv.in_channels, "out_channels": conv.out_channels,
            "kernel_size": list(_pair(conv.kernel_size)), "stride": list(_pair(conv.stride)),
            "padding": list(_pair(conv.padding)), "dilation": list(_pair(conv.dilation)),
            "bias": conv.bias is not None}


class _Factorized(nn.Module):
    """Shared: a spec dict and ``empty(spec)`` (placeholder weights to ``load_state_dict`` into)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self._spec = dict(spec)

    def spec(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **self._spec}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "_Factorized":
        return cls(**{k: v for k, v in spec.items() if k != "kind"})


@layer_class("LowRankLinear")
class LowRankLinear(_Factorized):
    """``y = second(first(x))``: (..., in) -> (..., rank) -> (..., out); rank*(in+out) weights."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__({"in_features": in_features, "out_features": out_features, "rank": rank, "bias": bias})
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)    # weight (r, in)
        self.second = nn.Linear(rank, out_features, bias=bias)   # weight (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@layer_class("LowRankConv2d")
class LowRankConv2d(_Factorized):
    """A kxk conv to ``rank`` channels, then a 1x1 conv to ``out``: the SVD of the (out, in*kh*kw) kernel."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: Any = 1, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True) -> None:
        super().__init__({"in_channels": in_channels, "out_channels": out_channels, "rank": rank,
                          "kernel_size": list(_pair(kernel_size)), "stride": list(_pair(stride)),
                          "padding": list(_pair(padding)), "dilation": list(_pair(dilation)), "bias": bias})
        self.rank = rank
        self.first = nn.Conv2d(in_channels, rank, _pair(kernel_size), _pair(stride), _pair(padding),
                               _pair(dilation), bias=False)   # (B, r, H', W')
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias)  # (B, out, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@layer_class("TuckerConv2d")
class TuckerConv2d(_Factorized):
    """Tucker-2: 1x1 ``in -> r_in``, kxk core ``r_in -> r_out`` (the original stride/padding), 1x1 ``r_out -> out``."""

    def __init__(self, in_channels: int, out_channels: int, rank_in: int, rank_out: int, kernel_size: Any = 3,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, bias: bool = True) -> None:
        super().__init__({"in_channels": in_channels, "out_channels": out_channels, "rank_in": rank_in,
                          "rank_out": rank_out, "kernel_size": list(_pair(kernel_size)), "stride": list(_pair(stride)),
                          "padding": list(_pair(padding)), "dilation": list(_pair(dilation)), "bias": bias})
        self.rank_in, self.rank_out = rank_in, rank_out
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False)   # (B, r_in, H, W)
        self.core = nn.Conv2d(rank_in, rank_out, _pair(kernel_size), _pair(stride), _pair(padding),
                              _pair(dilation), bias=False)           # (B, r_out, H', W')
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias)  # (B, out, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


@layer_class("CPConv2d")
class CPConv2d(_Factorized):
    """CP rank R: 1x1 ``in -> R``, (kh x 1) depthwise, (1 x kw) depthwise, 1x1 ``R -> out``.

    Stride, padding and dilation of the original conv are split by axis between the two depthwise
    convs; the first 1x1 has no bias, so padding its output with zeros equals padding the input.
    """

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size: Any = 3, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, bias: bool = True) -> None:
        super().__init__({"in_channels": in_channels, "out_channels": out_channels, "rank": rank,
                          "kernel_size": list(_pair(kernel_size)), "stride": list(_pair(stride)),
                          "padding": list(_pair(padding)), "dilation": list(_pair(dilation)), "bias": bias})
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation))
        self.rank = rank
        self.first = nn.Conv2d(in_channels, rank, 1, bias=False)                       # (B, R, H, W)
        self.vertical = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False)
        self.horizontal = nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias)                        # (B, out, H', W')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))


FACTORIZED = (LowRankLinear, LowRankConv2d, TuckerConv2d, CPConv2d)
