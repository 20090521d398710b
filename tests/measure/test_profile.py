"""profile(): every number in one record (its < 5 s target is timed in bench/profile_time.py), JSON round-trip, consistent with the parts."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure import Profile, artifact_size, estimate_energy, profile
from tests.measure.models import SmallCNN


@pytest.fixture(scope="module")
def cnn_profile():
    model = SmallCNN().train()
    return model, profile(model, torch.randn(1, 1, 28, 28))


def test_profile_numbers_match_the_parts(cnn_profile):
    model, p = cnn_profile
    params = sum(t.numel() for t in model.parameters())
    assert p.params_total == p.params_nonzero == params
    assert p.macs == sum(SmallCNN.hand_macs(1).values()) and p.flops == 2 * p.macs
    assert p.artifact_bytes == artifact_size(model)
    assert p.peak_memory_bytes >= 4 * params
    assert 0 < p.latency.p50_ms <= p.latency.p95_ms and p.latency.runs >= 5
    assert p.energy_mj_estimate == pytest.approx(estimate_energy(model, torch.randn(1, 1, 28, 28)).total_mj)
    assert "Horowitz" in p.energy_note
    assert sum(r.macs_share for r in p.layers) == pytest.approx(1.0)
    assert p.threads == p.latency.threads == torch.get_num_threads()
    assert p.inputs == ["float32[1, 1, 28, 28]"] and p.model == "SmallCNN" and p.device == "cpu"


def test_profile_leaves_model_and_threads_as_they_were(cnn_profile):
    model, _ = cnn_profile
    assert model.training
    before = torch.get_num_threads()
    profile(nn.Linear(4, 2), torch.ones(1, 4), threads=1, min_time_s=0.01, breakdown_runs=1)
    assert torch.get_num_threads() == before


def test_json_round_trip(cnn_profile):
    _, p = cnn_profile
    data = json.loads(p.to_json())
    assert data == p.to_dict()
    assert data["latency"]["p50_ms"] == p.latency.p50_ms
    assert Profile.from_dict(data) == p


def test_render_shows_summary_and_layers(cnn_profile):
    _, p = cnn_profile
    text = str(p)
    assert "energy (estimate)" in text and "Horowitz" in text
    assert "conv3" in text and f"{p.params_total:,}" in text


def test_a_gpu_profile_shows_the_roofline_per_layer(cnn_profile):
    """The table a CUDA profile prints: achieved TFLOP/s, GB/s and the share of the roofline limit, per layer
    (the numbers here come from the CPU timings with made-up peaks; the arithmetic is what is checked)."""
    import dataclasses

    from slimkit.measure._render import layer_roofline
    from slimkit.measure.cuda_profile import roofline

    _, p = cnn_profile
    gpu = dataclasses.replace(p, roofline=roofline(p.flops, p.artifact_bytes, p.latency.p50_ms, 0.001, 0.01))
    text = str(gpu)
    assert "roofline" in text and "TFLOP/s" in text and "% roofline" in text
    row = max(gpu.layers, key=lambda r: r.macs)
    tflops, gbps, share = map(float, layer_roofline(gpu, row))
    assert tflops == pytest.approx(2 * row.macs / row.time_ms / 1e9, rel=1e-2)
    weights = row.params * p.artifact_bytes / p.params_total  # fp32 model: 4 bytes per parameter
    assert weights == pytest.approx(4 * row.params, rel=0.02) and gbps == pytest.approx(weights / row.time_ms / 1e6, rel=1e-3)
    limit = max(2 * row.macs / 1e6, weights / 1e4)  # ms at 0.001 TFLOP/s and 0.01 GB/s
    assert share == pytest.approx(100 * limit / row.time_ms, rel=1e-2)


def test_wrong_example_is_one_clear_error():
    with pytest.raises(SlimkitError, match=r"SmallCNN failed on the example inputs \['float32\[1, 3\]'\]"):
        profile(SmallCNN(), torch.ones(1, 3))
