"""Per-scheme Linear modules: when each kernel may run (reasons in one line), shapes, numerics vs fp32."""

from __future__ import annotations

import pytest
import torch

from slimkit.formats import pack
from slimkit.runtime import cuda_kernels as ck
from slimkit.runtime import cuda_pack as cp
from tests.conftest import sqnr_db

CPU = torch.device("cpu")


def cuda_only(test):
    """Marked ``cuda`` and skipped where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")(test))


def _layer(n: int = 128, k: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) / k ** 0.5, torch.randn(n, generator=gen) * 0.1


@pytest.mark.parametrize(("scheme", "n", "k", "group", "words"), [
    ("fp8", 24, 256, 128, "multiples of 16"),
    ("int4", 128, 256, 48, "group_size in"),
    ("int4", 128, 320, 128, "does not divide K=320"),
    ("int4", 24, 256, 128, "N % 16"),
    ("2:4", 128, 256, 128, "CUDA only"),
])
def test_cpu_blockers_name_the_shape_rule(scheme, n, k, group, words):
    why = ck.blocker(scheme, n, k, CPU, group)
    assert why is not None and words in why and "\n" not in why


@pytest.mark.parametrize("scheme", ["bf16", "int8", "int4"])
def test_cpu_kernels_allowed_for_good_shapes(scheme):
    assert ck.blocker(scheme, 128, 256, CPU, 128) is None


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown scheme"):
        ck.blocker("int2", 128, 256, CPU)


# (scheme, SQNR floor dB of the module against the fp32 Linear on Gaussian inputs)
NUMERICS = [("bf16", 45.0), ("int8", 36.0), ("int4", 17.0), ("fp8", 25.0)]


@pytest.mark.parametrize(("scheme", "floor"), NUMERICS)
def test_module_on_cpu_keeps_shapes_adds_bias_and_tracks_fp32(scheme, floor):
    if scheme == "fp8" and ck._cpu_fp8_blocker() is not None:
        pytest.skip(ck._cpu_fp8_blocker())
    w, b = _layer()
    module = ck.make_linear(scheme, w, b, CPU, group_size=64)
    x = torch.randn(3, 7, 256)  # (B, T, K)
    y = module(x)
    assert y.shape == (3, 7, 128) and y.dtype == ck.OUT_DTYPE
    ref = torch.nn.functional.linear(x, w, b)
    assert sqnr_db(ref, y) > floor
    no_bias = ck.make_linear(scheme, w, None, CPU, group_size=64)
    assert torch.allclose((y.float() - no_bias(x).float()).mean((0, 1)), b, atol=0.02)


def test_int8_module_keeps_slimkits_integers():
    w, _ = _layer()
    q, scale = cp.int8_weight(w)
    module = ck.Int8Linear(q, scale, None, CPU)
    assert torch.equal(module.qweight_t.t(), q) and torch.equal(module.weight_scale.view(-1), scale)
    per_tensor = ck.Int8Linear(q, scale.max().reshape(1), None, CPU)  # a per-tensor scale broadcasts to (1, N)
    assert per_tensor.weight_scale.shape == (1, 128)


def test_int4_module_reads_its_group_from_the_scales():
    w, _ = _layer()
    module = ck.Int4Linear(*cp.int4_weight(w, 32), None, CPU)
    assert module.group_size == 32 and module.scales_and_zeros.shape == (256 // 32, 128, 2)


@cuda_only
@pytest.mark.parametrize(("scheme", "floor"), NUMERICS)
def test_module_on_cuda_tracks_fp32(scheme, floor):
    dev = torch.device("cuda")
    if ck.blocker(scheme, 128, 256, dev, 64) is not None:
        pytest.skip(ck.blocker(scheme, 128, 256, dev, 64))
    w, b = _layer()
    module = ck.make_linear(scheme, w, b, dev, group_size=64)
    x = torch.randn(3, 7, 256)
    y = module(x.to(dev))
    assert y.shape == (3, 7, 128) and y.dtype == ck.OUT_DTYPE
    assert sqnr_db(torch.nn.functional.linear(x, w, b), y.float().cpu()) > floor


@cuda_only
def test_int8_on_cuda_pads_small_batches_to_the_kernels_minimum():
    dev = torch.device("cuda")
    w, b = _layer()
    module = ck.make_linear("int8", w, b, dev)
    x = torch.randn(32, 256, device=dev)
    one = module(x[:1])  # M = 1 < 17: padded inside, sliced back
    assert one.shape == (1, 128)
    assert torch.equal(one, module(x)[:1])  # per-token scales: padding rows change nothing


@cuda_only
def test_semi_structured_module_equals_the_dense_pruned_layer():
    from slimkit.prune.nm import nm_mask

    dev = torch.device("cuda")
    if ck.blocker("2:4", 128, 256, dev) is not None:
        pytest.skip(ck.blocker("2:4", 128, 256, dev))
    w, b = _layer()
    w = w * nm_mask(w, 2, 4)
    module = ck.make_linear("2:4", w, b, dev)
    assert "semi-structured" in module.kernel
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    dense = torch.nn.functional.linear(x, w.to(dev, torch.bfloat16), b.to(dev, torch.bfloat16))
    assert sqnr_db(dense.float(), module(x).float()) > 40
    if module._cslt:  # the searched algorithm is kept per row count; odd row counts take F.linear
        assert set(module.algorithms) == {64}
        assert sqnr_db(dense.float(), module(x).float()) > 40  # second call: the kept algorithm
    odd = x[:5]
    assert sqnr_db(dense[:5].float(), module(odd).float()) > 40
    assert 5 not in module.algorithms
    from slimkit.measure.cuda_profile import state_nbytes

    assert state_nbytes(module) < 0.7 * 128 * 256 * 2 + 128 * 2  # compressed: half the values plus metadata


@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def test_int4_prefill_rows_run_a_dequantized_gemm_that_matches_the_kernel(device):
    from slimkit.measure.cuda_profile import state_nbytes

    w, b = _layer(64, 128)
    plain = ck.Int4Linear.from_float(w, b, device, group_size=32)
    both = ck.Int4Linear.from_float(w, b, device, group_size=32, prefill_rows=4)
    assert state_nbytes(both) - state_nbytes(plain) == 64 * 128 // 2  # the plain nibbles, half a byte a weight
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    assert torch.equal(both(x[:4]), plain(x[:4]))  # up to prefill_rows: the int4 kernel itself
    many = both(x)  # (8, 64): the dequantized weight through a bf16 GEMM
    assert sqnr_db(plain(x).float(), many.float()) > 40  # the same weight the kernel computes with
    wq = cp.dequantize_int4_kernel_form(pack.unpack_int4(both.packed), both.scales_and_zeros, 32, torch.bfloat16)
    assert sqnr_db(w.to(device), wq.float()) > 17  # int4 g32 on Gaussian weights (about 20 dB)
