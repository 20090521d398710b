"""Latency: ordered percentiles, adaptive run counts, threads pinned and restored, inference mode."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError
from slimkit.measure import Latency, measure_latency


def test_percentiles_are_ordered_and_fields_filled():
    lat = measure_latency(nn.Linear(32, 16), torch.randn(4, 32), min_time_s=0.05)
    assert isinstance(lat, Latency)
    assert 0 < lat.p50_ms <= lat.p95_ms
    assert lat.mean_ms > 0 and lat.cv >= 0
    assert lat.device == "cpu" and lat.threads == torch.get_num_threads()


def test_fast_function_gets_many_runs_and_fixed_repeats_are_exact():
    fast = measure_latency(lambda x: x + 1, torch.ones(4), min_time_s=0.05)
    assert fast.runs > 50
    assert measure_latency(lambda x: x + 1, torch.ones(4), repeats=17).runs == 17
    assert measure_latency(lambda x: x + 1, torch.ones(4), min_time_s=10.0, max_repeats=40).runs == 40


def test_slow_function_gets_min_repeats_and_its_true_duration():
    lat = measure_latency(lambda x: time.sleep(0.01), torch.ones(1), warmup=1, min_time_s=0.01, min_repeats=5)
    assert lat.runs == 5
    assert 10.0 <= lat.p50_ms <= lat.p95_ms < 200.0


def test_threads_pinned_during_timing_and_restored_after():
    before = torch.get_num_threads()
    seen: set[int] = set()

    def fn(x):
        seen.add(torch.get_num_threads())
        return x

    lat = measure_latency(fn, torch.ones(1), threads=1, repeats=3, warmup=1)
    assert seen == {1} and lat.threads == 1
    assert torch.get_num_threads() == before


def test_runs_in_inference_mode_and_restores_training_flag():
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.modes: set[tuple[bool, bool]] = set()

        def forward(self, x):
            self.modes.add((torch.is_inference_mode_enabled(), self.training))
            return self.fc(x)

    model = Probe().train()
    measure_latency(model, torch.ones(2, 3), repeats=2, warmup=1)
    assert model.modes == {(True, False)}
    assert model.training


def test_invalid_requests_are_clear_errors():
    with pytest.raises(SlimkitError, match="repeats=0"):
        measure_latency(lambda x: x, torch.ones(1), repeats=0)
    with pytest.raises(SlimkitError, match="threads=0"):
        measure_latency(lambda x: x, torch.ones(1), threads=0)
    with pytest.raises(SlimkitError, match="not supported"):
        measure_latency(lambda x: x, torch.ones(1), device="mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(SlimkitError, match="CUDA is not available"):
        measure_latency(nn.Linear(2, 2), torch.ones(1, 2), device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_latency_uses_the_gpu_and_moves_the_model_back():
    model = nn.Linear(256, 256)
    lat = measure_latency(model, torch.randn(64, 256), device="cuda", min_time_s=0.05)
    assert lat.device.startswith("cuda") and 0 < lat.p50_ms <= lat.p95_ms
    assert model.weight.device.type == "cpu"
