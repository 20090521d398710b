"""bench/gpu.py without a GPU: it refuses in one line and writes nothing; its target table from results."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_cuda_it_skips_in_one_line_and_writes_nothing():
    result = ROOT / "bench" / "results" / "gpu.json"
    before = result.stat().st_mtime if result.exists() else None
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    message = "skipped: no CUDA device (bench/gpu.py measures GPU kernels; nothing written)"
    assert done.stdout.strip().splitlines() == [message]
    assert (result.stat().st_mtime if result.exists() else None) == before


def test_targets_compare_each_measurement_with_its_threshold():
    bench = load_bench()
    roof = {"fraction_of_limit": 0.9}
    res = {"decoder": {"bf16": {"batch_1": {"tokens_per_s": 100.0, "roof": roof}},
                       "int4": {"batch_1": {"tokens_per_s": 236.0, "roof": roof}}},  # 48.8 / 20.7 us: the GEMV ratio
           "kernels": {"fp8_gemm_8192": {"speedup": 1.87, "fp8_roof": roof},
                       "sparse24_linear_8192": {"error": "RuntimeError: cuSPARSELt not available"},
                       "int8_linear_8192_tokens": {"speedup": 1.2, "int8_roof": roof}},
           "quality": {"fp32": {"score": 0.64}, "int8": {"cosine_to_fp32": 0.997}, "int4": {"cosine_to_fp32": 0.967}}}
    rows = {r["target"]: r for r in bench.targets(res)}
    assert rows["int4 weight-only decode, batch 1, tokens/s vs bf16"]["met"] is True
    assert rows["fp8 GEMM 8192^3 vs bf16"]["met"] is True
    assert rows["int8 linear, 8192 tokens, vs bf16"]["met"] is False
    assert rows["MiniLM cosine to fp32, int8"]["met"] is True and rows["MiniLM cosine to fp32, int4"]["met"] is False
    assert rows["MiniLM cosine to fp32, int4"]["threshold"] == 0.98
    assert not any("2:4" in name for name in rows)  # a failed measurement has no target row
