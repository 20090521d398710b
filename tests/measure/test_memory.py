"""Peak memory: at least the weights, plus exactly the activations a model allocates."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.measure import peak_memory


class Scratch(nn.Module):
    """Allocates one known-size float32 tensor of ``n`` elements, then reduces it away."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = torch.ones(self.n, device=x.device)  # (n,) float32: n * 4 bytes, where the model runs
        return x * self.scale + big.sum()


def _resident(model: nn.Module, x: torch.Tensor) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params + buffers + x.numel() * x.element_size()


def test_peak_counts_weights_and_a_known_allocation():
    n = 250_000  # 1 MB
    model, x = Scratch(n), torch.ones(4)
    extra = peak_memory(model, x) - _resident(model, x)
    assert n * 4 <= extra < n * 4 + 4096


def test_peak_is_at_least_the_weights():
    model = nn.Sequential(nn.Linear(200, 300), nn.ReLU(), nn.Linear(300, 10))
    params = sum(p.numel() * 4 for p in model.parameters())
    assert peak_memory(model, torch.randn(1, 200)) >= params


def test_peak_grows_with_batch_by_the_hidden_activations():
    hidden = 1000
    model = nn.Sequential(nn.Linear(100, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    small = peak_memory(model, torch.randn(64, 100))
    large = peak_memory(model, torch.randn(128, 100))
    # 64 more samples: their inputs, plus the hidden activation and its ReLU both alive at once
    expected = 64 * 100 * 4 + 2 * 64 * hidden * 4
    assert expected * 0.9 <= large - small <= expected * 1.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_peak_counts_a_known_allocation():
    n = 1 << 20
    model, x = Scratch(n), torch.ones(4)
    extra = peak_memory(model, x, device="cuda") - _resident(model, x)
    assert n * 4 <= extra < n * 4 + (1 << 20)  # caching-allocator rounding
