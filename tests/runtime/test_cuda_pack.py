"""GPU kernel layouts: scale math and packing round trips on CPU (torch's CPU kernels run the same math);
the CUDA int4 layout itself on a GPU."""

from __future__ import annotations

import pytest
import torch

from slimkit.formats import pack
from slimkit.runtime import cuda_pack as cp
from tests.conftest import sqnr_db


def cuda_only(test):
    """Marked ``cuda`` and skipped where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


def _data(n: int = 96, k: int = 256, m: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)  # w (N, K), x (M, K)


def test_int8_rows_round_trip_within_half_a_step_and_zero_rows_exact():
    _, x = _data()
    x[3] = 0
    q, scale = cp.int8_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (40, 1)
    assert int(q.abs().max()) == 127  # every non-zero row uses the full range
    err = (q.float() * scale - x).abs()
    assert bool((err <= scale / 2 + 1e-7).all())
    assert bool((q[3] == 0).all()) and float(scale[3]) == 1.0


def test_fp8_rows_keep_the_e4m3_range_and_about_30_db():
    w, _ = _data()
    q, scale = cp.fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (96, 1)
    assert float(q.float().abs().amax(1).min()) == cp.FP8_MAX  # each row's max lands on 448
    assert sqnr_db(w, q.float() * scale) > 29.0  # 3 mantissa bits: ~31 dB on Gaussian rows


def test_int8_matmul_on_cpu_int_mm_matches_fp32():
    w, x = _data()
    qw, sw = cp.int8_weight(w)
    qx, sx = cp.int8_rows(x)
    y = cp.int8_matmul(qx, sx, qw.t(), sw.view(1, -1), torch.float32)
    exact = (qx.float() * sx) @ (qw.float() * sw.view(-1, 1)).t()  # the integers' own product in fp32
    assert sqnr_db(exact, y) > 100  # int32 accumulation is exact; only the rescale rounds
    assert sqnr_db(x @ w.t(), y) > 36


def test_fp8_matmul_on_cpu_matches_fp32():
    from slimkit.runtime.cuda_kernels import _cpu_fp8_blocker

    if _cpu_fp8_blocker() is not None:
        pytest.skip(_cpu_fp8_blocker())
    w, x = _data()
    qw, sw = cp.fp8_rows(w)
    qx, sx = cp.fp8_rows(x)
    y = cp.fp8_matmul(qx, sx, qw, sw.view(1, -1), torch.float32, fast_accum=False)
    exact = (qx.float() * sx) @ (qw.float() * sw).t()
    assert sqnr_db(exact, y) > 60
    assert sqnr_db(x @ w.t(), y) > 25


def test_swap_nibbles_puts_even_elements_high_and_is_its_own_inverse():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    ours = pack.pack_int4(q)  # element 2j low nibble
    theirs = cp.swap_nibbles(ours)
    assert torch.equal(theirs >> 4, q[:, 0::2]) and torch.equal(theirs & 0x0F, q[:, 1::2])
    assert torch.equal(cp.swap_nibbles(theirs), ours)


@pytest.mark.parametrize(("k", "tiles"), [(4096, 8), (14336, 8), (384, 8), (64, 4), (96, 2), (48, None)])
def test_inner_k_tiles(k, tiles):
    assert cp.inner_k_tiles(k) == tiles


def test_int4_scales_and_zeros_dequantize_to_slimkits_int4_meaning():
    w, _ = _data()
    packed, scale, zero = cp.int4_weight(w, 64)
    sz = cp.int4_scales_and_zeros(scale, zero)
    assert sz.shape == (256 // 64, 96, 2) and sz.dtype == torch.bfloat16
    kernel_form = cp.dequantize_int4_kernel_form(pack.unpack_int4(packed), sz, 64)
    assert sqnr_db(pack.dequantize_int4(packed, scale, zero), kernel_form) > 45  # bf16 scale/zero rounding only


@pytest.mark.parametrize("group", [32, 128])
def test_int4_cpu_kernel_computes_the_packed_weight(group):
    w, x = _data()
    packed, scale, zero = cp.int4_weight(w, group)
    weight = cp.int4_kernel_weight(packed, torch.device("cpu"))
    y = cp.int4_matmul(x, weight, group, cp.int4_scales_and_zeros(scale, zero))
    assert y.shape == (40, 96) and y.dtype == torch.bfloat16
    assert sqnr_db(x @ pack.dequantize_int4(packed, scale, zero).t(), y) > 40
    assert sqnr_db(x @ w.t(), y) > (20 if group == 32 else 17)


@cuda_only
@pytest.mark.parametrize("k", [4096, 96])  # inner_k_tiles 8 and 2
def test_int4_cuda_layout_computes_the_packed_weight(k):
    w, x = _data(n=128, k=k)
    dev = torch.device("cuda")
    packed, scale, zero = cp.int4_weight(w, 32)
    weight = cp.int4_kernel_weight(packed, dev)
    y = cp.int4_matmul(x.to(dev), weight, 32, cp.int4_scales_and_zeros(scale, zero).to(dev))
    assert sqnr_db(x @ pack.dequantize_int4(packed, scale, zero).t(), y.cpu()) > 40  # nibble order and tiles


@cuda_only
def test_int8_and_fp8_on_cuda_match_the_cpu_integers():
    w, x = _data(n=128, k=256, m=64)
    dev = torch.device("cuda")
    qw, sw = cp.int8_weight(w)
    qx, sx = cp.int8_rows(x)
    exact = (qx.float() * sx) @ (qw.float() * sw.view(-1, 1)).t()
    y = cp.int8_matmul(qx.to(dev), sx.to(dev), qw.to(dev).t(), sw.view(1, -1).to(dev), torch.float32)
    assert sqnr_db(exact, y.cpu()) > 100
    if torch.cuda.get_device_capability() >= (8, 9):
        fw, fsw = cp.fp8_rows(w)
        fx, fsx = cp.fp8_rows(x)
        y8 = cp.fp8_matmul(fx.to(dev), fsx.to(dev), fw.to(dev), fsw.view(1, -1).to(dev), torch.bfloat16, True)
        exact = (fx.float() * fsx) @ (fw.float() * fsw).t()
        assert sqnr_db(exact, y8.float().cpu()) > 35  # bf16 output and fast accumulation
