"""GPU timing helpers: roofline arithmetic (against the issue's H100 reference points), weight bytes as the
kernels read them, which peak a model is compared with; events, graphs and peaks on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimkit.measure.cuda_profile import peak_key, roofline, state_nbytes
from slimkit.runtime import cuda as rc

H100_BF16_TFLOPS, H100_GBPS = 761.0, 3000.0


def cuda_only(test):
    """Marked ``cuda`` and skipped where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


def test_decode_gemv_is_memory_bound_near_the_limit():
    n = 8192
    r = roofline(2 * n * n, 2 * n * n, 0.0488, H100_BF16_TFLOPS, H100_GBPS)  # 1x8192x8192 bf16 in 48.8 us
    assert r["bound"] == "memory"
    assert r["limit_ms"] == pytest.approx(2 * n * n / 3e12 * 1e3)  # 44.7 us to read 128 MiB at 3 TB/s
    assert r["fraction_of_limit"] == pytest.approx(0.917, abs=0.001)
    assert r["achieved_gbps"] == pytest.approx(2750.6, abs=0.5)


def test_square_gemm_is_compute_bound():
    n = 8192
    flops = 2 * n ** 3
    ms = flops / (H100_BF16_TFLOPS * 1e9)  # exactly at the measured peak
    r = roofline(flops, 3 * 2 * n * n, ms, H100_BF16_TFLOPS, H100_GBPS)
    assert r["bound"] == "compute" and r["fraction_of_limit"] == pytest.approx(1.0)
    assert r["achieved_tflops"] == pytest.approx(761.0) and r["bandwidth_fraction"] == pytest.approx(0.0929, abs=1e-4)


def test_roofline_refuses_non_positive_times():
    with pytest.raises(ValueError):
        roofline(1.0, 1.0, 0.0, 1.0, 1.0)


def test_weight_bytes_as_each_scheme_stores_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.Linear(512, 256, bias=False)).eval()
    n_weights = 2 * 256 * 512
    assert state_nbytes(model) == 4 * n_weights  # fp32
    assert state_nbytes(rc.build_cuda(model, "bf16", device="cpu")) == 2 * n_weights
    int8 = rc.build_cuda(model, "int8", device="cpu")
    assert state_nbytes(int8) == n_weights + 4 * (512 + 256)  # int8 + a float32 scale per output row
    int4 = rc.build_cuda(model, "int4", device="cpu", group_size=128)
    sz = 2 * 2 * (256 // 128 * 512 + 512 // 128 * 256)  # bf16 (scale, zero) per group and output
    assert state_nbytes(int4) == n_weights // 2 + sz


def test_a_shared_tensor_counts_once():
    a = nn.Linear(64, 64, bias=False)
    b = nn.Linear(64, 64, bias=False)
    b.weight = a.weight
    assert state_nbytes(nn.Sequential(a, b)) == 64 * 64 * 4


def test_peak_follows_the_dominant_scheme():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 24)).eval()
    assert peak_key(model) == "bf16_tflops"
    assert peak_key(rc.build_cuda(model, "int8", device="cpu")) == "int8_tops"
    assert peak_key(rc.build_cuda(model, "int4", device="cpu", group_size=64)) == "bf16_tflops"


@cuda_only
def test_gpu_peaks_and_event_timing_are_consistent():
    from slimkit.measure.cuda_profile import device_peaks, time_ms

    peaks = device_peaks(torch.cuda.current_device())
    assert peaks["bf16_tflops"] > 10 and peaks["hbm_gbps"] > 100
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t = time_ms(lambda: a @ a)["median_ms"]
    achieved = 2 * 4096 ** 3 / t / 1e9
    assert 0.2 * peaks["bf16_tflops"] < achieved < 1.1 * peaks["bf16_tflops"]


@cuda_only
def test_profile_on_cuda_times_graph_replays_and_reports_the_roofline():
    import slimkit as sk

    built = rc.build_cuda(nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)), "int8")
    p = sk.measure.profile(built, torch.randn(64, 1024), device="cuda", min_time_s=0.2)
    roof = p.roofline
    assert roof is not None and roof["timing"] == "cuda-graph" and roof["peak_kind"] == "int8_tops"
    assert 0 < roof["fraction_of_limit"] <= 1.2 and p.latency.p50_ms > 0
