"""The shared OBS sweep's pieces: a conv's GEMM rows in its weight's order, Hessians, and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.calibrate import obs
from slimkit.core.errors import SlimkitError


def test_conv_gemm_rows_times_the_flattened_weight_is_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=False)
    x = torch.randn(2, 3, 9, 9)
    rows = obs.gemm_rows(conv, x)  # (B*L, C*kh*kw)
    y = rows @ conv.weight.reshape(5, -1).T  # (B*L, out)
    ref = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)  # (B*H'*W', out)
    assert (y - ref).abs().max() < 1e-5


def test_hessians_of_a_conv_and_a_linear_are_their_inputs_gram_matrices():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    batches = [(torch.randn(3, 2, 5, 5),), (torch.randn(2, 2, 5, 5),)]
    hs = obs.input_hessians(model, ["0", "2"], batches)
    x = torch.cat([b[0] for b in batches])
    patches = obs.gemm_rows(model[0], x)
    assert hs["0"].shape == (18, 18) and torch.allclose(hs["0"], patches.T @ patches / patches.shape[0], atol=1e-5)
    flat = model[1](model[0](x)).detach()
    assert torch.allclose(hs["2"], flat.T @ flat / 5, atol=1e-4)


def test_what_the_sweep_cannot_treat_is_named():
    assert obs.unsupported(nn.Linear(4, 4)) is None and obs.unsupported(nn.Conv2d(4, 4, 3)) is None
    assert "depthwise" in obs.unsupported(nn.Conv2d(4, 4, 3, groups=4))
    assert "padding" in obs.unsupported(nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(SlimkitError, match="never reached"):
        obs.input_hessians(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), ["1"], [])
