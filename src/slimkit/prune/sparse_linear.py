"""CPU sparse execution of pruned Linear layers (CSR weight), used only where it measured faster.

Sparse kernels lose to dense GEMM until the weight is very sparse; how sparse depends on the
batch and the thread count. :data:`CROSSOVER` holds the measured answer from
``bench/sparse_cpu.py`` (fp32, see BENCHMARKS.md): per thread count (1, 2) and measured batch,
the lowest sparsity from which CSR beat dense on every measured shape. :func:`sparsify` converts
a layer only when its sparsity reaches the crossover of the current thread count (more than 2:
unmeasured, the 2-thread numbers are used) and nearest measured batch, and the layer is at least
as large as the smallest measured shape; everything else stays dense, with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import StepRecord, add_record
from slimkit.core.registry import layer_class
from slimkit.train.masks import log, prunable

#: Measured crossover sparsity per thread count, then per batch (tokens per call), from
#: bench/results/sparse_cpu.json (2026-11-23). The 1-thread rows are clean. Every 2-thread row of
#: that run was disturbed by other jobs on the shared 2 cores, so 2 threads reuse the 1-thread
#: values; the undisturbed 2-thread rows seen on re-measuring (384->1536: 0.8 at 1 token, 0.7 at
#: 32) crossed over earlier, so this errs towards staying dense.
CROSSOVER: dict[int, dict[int, float | None]] = {1: {1: 0.95, 32: 0.8, 256: 0.9}, 2: {1: 0.95, 32: 0.8, 256: 0.9}}
#: Smallest measured weight (384 x 1536): below it per-call overhead dominates, unmeasured.
MIN_WEIGHTS = 384 * 1536


def _csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that sparse CSR support is in beta
        return dense.to_sparse_csr()


@layer_class("prune.SparseLinear")
class SparseLinear(nn.Module):
    """``nn.Linear`` for inference with a CSR weight: ``y = x W^T + b`` via ``torch.addmm``.

    Its state dict holds the dense ``weight`` (the artifact stores that sparsely anyway), so
    artifacts of sparse and dense models read the same.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_csr = _csr(torch.zeros(out_features, in_features))  # (out, in)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> "SparseLinear":
        out = cls(layer.in_features, layer.out_features, layer.bias is not None)
        out.weight_csr = _csr(layer.weight.detach().float())
        if layer.bias is not None:
            out.bias.data.copy_(layer.bias.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        x2 = x.reshape(-1, self.in_features).t()  # (in, N)
        if x2.shape[1] == 1 and self.bias is not None:  # addmm with an (in, 1) operand is ~100x slower
            return torch.addmv(self.bias, self.weight_csr, x2[:, 0]).reshape(*x.shape[:-1], self.out_features)
        if self.bias is None:
            y = torch.sparse.mm(self.weight_csr, x2.contiguous())  # (out, N)
        else:
            y = torch.addmm(self.bias[:, None], self.weight_csr, x2)  # (out, N)
        return y.t().reshape(*x.shape[:-1], self.out_features)  # (..., out)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.weight_csr.values().numel() / (self.in_features * self.out_features)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "SparseLinear":
        return cls(int(spec["in_features"]), int(spec["out_features"]), bool(spec["bias"]))

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight_csr.to_dense()  # (out, in)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        w = state_dict.pop(prefix + "weight", None)
        if w is None:
            missing_keys.append(prefix + "weight")
        elif tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: shape {tuple(w.shape)}, expected {(self.out_features, self.in_features)}")
        else:
            self.weight_csr = _csr(w.detach().float())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sparsity={self.sparsity:.3f}"


def crossover_for(batch: int, threads: int | None = None) -> float | None:
    """Measured crossover sparsity at the measured batch nearest to ``batch`` (in log scale)."""
    if batch < 1:
        raise SlimkitError(f"batch={batch} is not a number of tokens per call", "use a positive integer")
    table = CROSSOVER[min(max(threads or torch.get_num_threads(), 1), 2)]
    nearest = min(table, key=lambda b: abs(math.log(b) - math.log(batch)))
    return table[nearest]


def sparse_is_faster(layer: nn.Linear, batch: int) -> tuple[bool, str]:
    """The rule, with the reason: CSR only at or above the measured crossover for this batch."""
    w = layer.weight
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return False, f"weight is {w.dtype} on {w.device}; measured for fp32 on CPU"
    if w.numel() < MIN_WEIGHTS:
        return False, f"{w.numel()} weights is below the smallest measured layer ({MIN_WEIGHTS})"
    s = float((w == 0).sum()) / w.numel()
    cross = crossover_for(batch)
    if cross is None:
        return False, f"CSR never beat dense on every measured shape at batch ~{batch}"
    if s < cross:
        return False, f"sparsity {s:.3f} < measured crossover {cross} at batch ~{batch}"
    return True, f"sparsity {s:.3f} >= measured crossover {cross} at batch ~{batch}"


def sparsify(model: nn.Module, batch: int = 1, *, targets: str | tuple[str, ...] = "all-linear",
             exclude: str | tuple[str, ...] = (), force: bool = False) -> nn.Module:
    """Swap Linear layers for :class:`SparseLinear` where the measured rule says CSR is faster (in place).

    ``batch`` is the number of tokens (rows) per call you will run. ``force=True`` converts
    every targeted Linear regardless (for testing). The decisions are in the model's :class:`SparsifyRecord`.
    """
    names, _ = prunable(model, targets, exclude)
    decisions: dict[str, str] = {}
    converted = []
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        faster, why = sparse_is_faster(layer, batch)
        decisions[name] = why
        if faster or force:
            set_submodule(model, name, SparseLinear.from_dense(layer))
            converted.append(name)
        else:
            log.info("kept dense: %s (%s)", name, why)
    add_record(model, SparsifyRecord("prune.sparsify", {"batch": batch, "force": force}, batch=batch,
                                     converted=converted, decisions=decisions))
    return model


@dataclasses.dataclass
class SparsifyRecord(StepRecord):
    """Which Linear layers run on CSR kernels, and the measured rule's reason for each layer."""

    batch: int = 1
    converted: list[str] = dataclasses.field(default_factory=list)
    decisions: dict[str, str] = dataclasses.field(default_factory=dict)

