"""One Linear module per GPU scheme, each running one real kernel, and the rules for when it can.

``blocker(scheme, n, k, device, group_size)`` answers, before anything is built, why a kernel
cannot run a layer of weight (N, K) on ``device`` (shape, compute capability, torch version), in
one line, or None. The modules then take a float weight (N, K) and keep only what the kernel
reads. Inputs (..., K) of any float dtype; outputs (..., N) in ``OUT_DTYPE`` (bf16).

On CPU the int8, int4 and fp8 modules run torch's CPU kernels for the same math (``_int_mm``,
``_weight_int4pack_mm_for_cpu``, ``_scaled_mm`` where this torch build has it), which is how the
scale and packing code is tested without a GPU; speed claims come from CUDA only.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.sparse import to_sparse_semi_structured

from slimkit.formats import pack
from slimkit.runtime import cuda_pack as cp

OUT_DTYPE = torch.bfloat16
SCHEMES = ("bf16", "int8", "int4", "fp8", "2:4")
#: Rows below which CUDA's ``_int_mm`` refuses (it needs M > 16): activations are zero-padded up to it.
INT8_MIN_ROWS = 17
#: Smallest compute capability per scheme on CUDA (tinygemm and 2:4 need Ampere; row-wise fp8 Ada/Hopper).
MIN_CAPABILITY = {"int8": (7, 5), "int4": (8, 0), "fp8": (8, 9), "2:4": (8, 0)}


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.aten, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def blocker(scheme: str, n: int, k: int, device: torch.device, group_size: int = 128) -> str | None:
    """Why ``scheme`` cannot run an (N, K) weight on ``device``, or None when its kernel may."""
    if scheme == "bf16":
        return None
    cuda = device.type == "cuda"
    if cuda and torch.cuda.get_device_capability(device) < MIN_CAPABILITY[scheme]:
        have = torch.cuda.get_device_capability(device)
        return f"needs compute capability >= {MIN_CAPABILITY[scheme]}, this GPU has {have}"
    if scheme == "int8":
        if not _has_op("_int_mm"):
            return f"torch {torch.__version__} has no _int_mm"
        if cuda and (k % 8 or n % 8):
            return f"_int_mm needs K and N multiples of 8, weight is (N={n}, K={k})"
        return None
    if scheme == "int4":
        if group_size not in cp.INT4_GROUPS:
            return f"tinygemm needs group_size in {cp.INT4_GROUPS}, got {group_size}"
        if k % group_size:
            return f"group_size {group_size} does not divide K={k}"
        op = "_weight_int4pack_mm" if cuda else "_weight_int4pack_mm_for_cpu"
        if not _has_op(op):
            return f"torch {torch.__version__} has no {op}"
        if cuda and (n % 8 or cp.inner_k_tiles(k) is None):
            return f"tinygemm needs N % 8 == 0 and K % 32 == 0, weight is (N={n}, K={k})"
        if not cuda and n % 16:
            return f"the CPU int4 kernel needs N % 16 == 0, weight is (N={n}, K={k})"
        return None
    if scheme == "fp8":
        if not hasattr(torch, "float8_e4m3fn") or not _has_op("_scaled_mm"):
            return f"torch {torch.__version__} has no float8_e4m3fn/_scaled_mm"
        if k % 16 or n % 16:
            return f"_scaled_mm needs K and N multiples of 16, weight is (N={n}, K={k})"
        return None if cuda else _cpu_fp8_blocker()
    if scheme == "2:4":
        if not cuda:
            return "2:4 semi-structured kernels (cuSPARSELt/CUTLASS) run on CUDA only"
        if n % 32 or k % 64:
            return f"semi-structured tiles need N % 32 == 0 and K % 64 == 0, weight is (N={n}, K={k})"
        return None
    raise ValueError(f"unknown scheme {scheme!r}")


@functools.lru_cache(maxsize=1)
def _cpu_fp8_blocker() -> str | None:
    """Whether this torch build has a CPU ``_scaled_mm`` with row-wise scales (2.13 has; older may not)."""
    try:
        a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
        cp.fp8_matmul(a, torch.ones(16, 1), a, torch.ones(1, 16), OUT_DTYPE, False)
        return None
    except (RuntimeError, NotImplementedError) as exc:
        return f"no CPU _scaled_mm with row-wise scales in torch {torch.__version__}: {str(exc).splitlines()[0][:80]}"


class _KernelLinear(nn.Module):
    """Common shape handling: (..., K) -> (M, K) -> kernel -> (..., N), bias added in ``OUT_DTYPE``."""

    scheme = "bf16"
    kernel = "aten.mm (bf16)"

    def __init__(self, n: int, k: int, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = k, n
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, OUT_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = self._mm(x2)  # (M, N) OUT_DTYPE
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)  # (..., N)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Bf16Linear(_KernelLinear):
    """The reference and the fallback: bf16 weight, bf16 GEMM."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(*weight.shape, bias, device)
        self.register_buffer("weight", weight.detach().to(device, OUT_DTYPE).contiguous())  # (N, K)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(OUT_DTYPE), self.weight)


class Int8Linear(_KernelLinear):
    """int8 weights (per output row) x int8 activations (per token, quantized each call), int32 accumulate.

    Built from slimkit's int8 format: ``q`` int8 (N, K) and ``scale`` (N,) or (1,) per tensor.
    """

    scheme, kernel = "int8", "aten._int_mm"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(*q.shape, bias, device)
        n = q.shape[0]
        self.register_buffer("qweight_t", q.to(device).t())  # (K, N) column-major view of (N, K)
        self.register_buffer("weight_scale", scale.float().to(device).expand(n).reshape(1, n).contiguous())  # (1, N)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> Int8Linear:
        return cls(*cp.int8_weight(weight), bias, device)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        if x.is_cuda and m < INT8_MIN_ROWS:
            x = F.pad(x, (0, 0, 0, INT8_MIN_ROWS - m))  # (17, K): CUDA's _int_mm needs M > 16
        xq, x_scale = cp.int8_rows(x)
        return cp.int8_matmul(xq, x_scale, self.qweight_t, self.weight_scale, OUT_DTYPE)[:m]


class Int4Linear(_KernelLinear):
    """int4 weights in groups (asymmetric, slimkit's int4 format), bf16 activations: tinygemm.

    tinygemm is a decode kernel: on an H100 it is 2.3x bf16 at 1 row, level at 8 and 25x slower at
    2,048 (prefill). ``prefill_rows=R`` also keeps the plain nibbles (0.5 byte a weight more) and runs
    calls of more than R rows on a bf16 weight dequantized for that call, then a dense GEMM.
    """

    scheme = "int4"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 device: torch.device, prefill_rows: int | None = None) -> None:
        n, k = packed.shape[0], packed.shape[1] * 2
        super().__init__(n, k, bias, device)
        self.group_size = k // scale.shape[1]
        self.kernel = "aten._weight_int4pack_mm" if device.type == "cuda" else "aten._weight_int4pack_mm_for_cpu"
        self.register_buffer("qweight", cp.int4_kernel_weight(packed.to(device), device))
        self.register_buffer("scales_and_zeros", cp.int4_scales_and_zeros(scale, zero).to(device))  # (K/g, N, 2)
        self.prefill_rows = prefill_rows
        # slimkit's (N, K/2) nibbles, for the dequantized path only
        self.register_buffer("packed", packed.to(device).contiguous() if prefill_rows is not None else None)
        if prefill_rows is not None:
            self.kernel += f", dequantized bf16 GEMM above {prefill_rows} rows"

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                   group_size: int = 128, prefill_rows: int | None = None) -> Int4Linear:
        return cls(*cp.int4_weight(weight, group_size), bias, device, prefill_rows)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > self.prefill_rows:
            w = cp.dequantize_int4_kernel_form(pack.unpack_int4(self.packed), self.scales_and_zeros, self.group_size,
                                               OUT_DTYPE)  # (N, K)
            return F.linear(x.to(OUT_DTYPE), w)
        return cp.int4_matmul(x, self.qweight, self.group_size, self.scales_and_zeros)


class Fp8Linear(_KernelLinear):
    """fp8 e4m3 weights (per output row) x fp8 activations (per token, each call): ``_scaled_mm``."""

    scheme, kernel = "fp8", "aten._scaled_mm (row-wise)"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(*weight.shape, bias, device)
        q, scale = cp.fp8_rows(weight)
        self.fast_accum = device.type == "cuda"
        self.register_buffer("qweight", q.to(device).contiguous())  # (N, K) fp8
        self.register_buffer("weight_scale", scale.to(device).view(1, -1).contiguous())  # (1, N)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        xq, x_scale = cp.fp8_rows(x)
        return cp.fp8_matmul(xq, x_scale, self.qweight, self.weight_scale, OUT_DTYPE, self.fast_accum)


class SemiSparseLinear(_KernelLinear):
    """A 2:4-sparse bf16 weight compressed for the sparse tensor cores (cuSPARSELt, else CUTLASS).

    With cuSPARSELt, the first call at each row count M searches the library's algorithms for that
    GEMM shape and keeps the fastest (like cuDNN's benchmark mode): on an H100 at 8192^3 the search
    takes the sparse GEMM from 1.24 ms (``F.linear``'s default algorithm) to 1.13 ms. A new M seen
    while a CUDA graph is being captured, inside ``torch.compile``, or with M not a multiple of 8
    goes through ``F.linear`` (torch's default algorithm, rows padded as the kernels need).
    """

    scheme = "2:4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> None:
        super().__init__(*weight.shape, bias, device)

        sparse = to_sparse_semi_structured(weight.detach().to(device, OUT_DTYPE).contiguous())
        self.kernel = f"semi-structured 2:4 ({getattr(sparse, 'BACKEND', 'sparse')})"
        # The compressed tensor is a subclass that saving, counting and ``.to`` do not handle; its plain
        # parts (values + metadata) are registered as buffers, sharing memory, so state_dict shows real bytes.
        self._sparse = sparse
        for key in ("packed", "meta"):
            part = getattr(sparse, key, None)
            self.register_buffer(f"weight_{key}", part if isinstance(part, torch.Tensor) else None)
        self._cslt = getattr(sparse, "BACKEND", "") == "cusparselt" and hasattr(torch, "_cslt_sparse_mm_search")
        self.algorithms: dict[int, int] = {}  # row count M -> cuSPARSELt algorithm id

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(OUT_DTYPE)
        m = x.shape[0]
        if self._cslt and m % 8 == 0 and not torch.compiler.is_compiling():
            alg = self.algorithms.get(m)
            if alg is None and not torch.cuda.is_current_stream_capturing():
                alg = self.algorithms[m] = int(torch._cslt_sparse_mm_search(self.weight_packed, x.t(),
                                                                            transpose_result=True))
            if alg is not None:
                # (N, K) sparse @ (K, M) -> written transposed as (M, N)
                return torch._cslt_sparse_mm(self.weight_packed, x.t(), transpose_result=True, alg_id=alg)
        return F.linear(x, self._sparse)


def make_linear(scheme: str, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                group_size: int = 128, int4_prefill_rows: int | None = None) -> _KernelLinear:
    """The module for ``scheme`` built from a float weight (N, K) and bias (N,)."""
    if scheme == "int4":
        return Int4Linear.from_float(weight, bias, device, group_size, int4_prefill_rows)
    if scheme == "int8":
        return Int8Linear.from_float(weight, bias, device)
    classes = {"bf16": Bf16Linear, "fp8": Fp8Linear, "2:4": SemiSparseLinear}
    return classes[scheme](weight, bias, device)
