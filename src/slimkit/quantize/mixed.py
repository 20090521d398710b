"""Sensitivity-driven mixed precision: bits per layer from {4, 8, 16} under a byte budget.

Each layer's predicted cost at ``b`` bits is its measured sensitivity (``layer_sensitivity``:
only that layer quantized, default ``measure="output"``: output noise-to-signal ratio, which adds
up over layers roughly as independent noise does). With ``int4_groups`` the int4 group size is a
choice too: a Linear layer may also take int4 with e.g. 128 inputs per scale/zero (4.5 bits a
weight instead of 6 at group 32), so robust layers free bytes that pay for int8 on sensitive ones
at the same total. Choosing one option per layer to minimise the summed cost with the summed bytes
under the budget is a multiple-choice knapsack; it is solved
exactly as a 0/1 integer program with ``scipy.optimize.milp`` (HiGHS). The choice is realised with
the stored modules the other techniques use: grouped int4 and per-channel int8 weight-only
(``QuantLinear`` / ``QuantConv2d``), float16 weights (``HalfLinear`` / ``HalfConv2d``) and, with
``int4_convs``, symmetric per-channel int4 convolutions (``BitConv2d``, 4-bit codes); it runs on
ONNX Runtime (``runtime.onnx_nbits``) or torch.

Bytes per layer (bias excluded: it is float32 at every width): int4 ``N*K/2`` + float32 scale and
zero per group (``8*N*K/group``); int4 conv ``N*ceil(K/2)`` + two float32 per channel; int8 ``N*K`` + a float32
scale per channel; 16 bits ``2*N*K``.

Activations stay float. Int8-activation layers are not offered: under a byte budget they cost the
same bytes as int8 weight-only and only add error, so the solver would never pick them; they pay
off in latency, which needs ONNX Runtime's integer kernels, and slimkit's ONNX Runtime path
re-quantizes a whole model in one mode (weight-only layers have no path there).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from slimkit.core.config import technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.measure.sensitivity import layer_sensitivity, weight_layers
from slimkit.quantize.extreme_modules import int4_per_channel
from slimkit.quantize.half import HalfConv2d, HalfLinear
from slimkit.quantize.modules import QuantConv2d, QuantLinear
from slimkit.quantize.options import QuantConfig, Targets, check_choice
from slimkit.quantize.ptq import quantize_embeddings, target_layers
from slimkit.quantize.record import MixedRecord

log = logging.getLogger("slimkit.quantize")

WIDTHS = (4, 8, 16)
INT4_GROUPS = (32, 64, 128)


@technique("quantize.Mixed", stage="quantize", search="mixed")
@dataclasses.dataclass(frozen=True)
class Mixed(QuantConfig):
    """Per-layer bits minimising predicted damage with the layers' bytes <= ``budget_ratio`` x their fp32 bytes.

    ``sensitivity``: optional ``{layer: drop at 4 bits}`` measured elsewhere (the optimizer's); the
    8-bit drop is then taken as 1/256 of it (noise power falls 4x per bit) and nothing is measured.
    ``narrowest``: no budget and no measurement; every layer takes the narrowest candidate width it
    can be stored at (Linear layers 4-bit with one scale per row, convolutions 8-bit): the smallest
    artifact.
    ``int4_convs``: convolutions may take 4 bits too (symmetric per channel, packed ``BitConv2d``).
    ``measured``: ``{"4": {layer: cost}, "8": {...}}`` from :func:`measure_costs` for the same model,
    so several budgets share one measurement (a curve); layers it lacks are measured.
    ``int4_groups``: further int4 group sizes (from 32, 64, 128) a Linear layer may take beside
    ``group_size``; each is measured and priced as its own option (cost key ``"4g128"``; ``"4"`` is
    ``group_size``).
    ``activations``: ``"dynamic"`` makes the 8-bit layers int8 x int8 (inputs quantized per batch:
    fbgemm Linear, oneDNN Conv) beside weight-only int4 layers, for speed where the kernels win;
    ``"none"`` keeps every layer weight-only. Bytes are the same; the 8-bit cost is measured on the
    weights, so the activations' own rounding is not in it.
    """

    budget_ratio: float = 0.25
    candidates: tuple[int, ...] = WIDTHS
    group_size: int = 32
    measure: str = "output"
    targets: Targets = "all"
    exclude: Targets = ()
    embeddings: bool = True
    sensitivity: Mapping[str, float] | None = None
    narrowest: bool = False
    int4_convs: bool = False
    measured: Mapping[str, Mapping[str, float]] | None = None
    activations: str = "none"
    int4_groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.candidates or any(b not in WIDTHS for b in self.candidates):
            raise SlimkitError(f"candidates={self.candidates!r} must be a non-empty subset of {WIDTHS}",
                               "use e.g. (4, 8, 16)")
        check_choice("group_size", self.group_size, (32, 64, 128))
        check_choice("measure", self.measure, ("output", "metric"))
        check_choice("activations", self.activations, ("none", "dynamic"))
        groups = tuple(self.int4_groups)
        if any(g not in INT4_GROUPS for g in groups) or len(set(groups)) < len(groups) or self.group_size in groups:
            raise SlimkitError(f"int4_groups={groups!r} must be distinct sizes from {INT4_GROUPS} other than "
                               f"group_size={self.group_size}", "use e.g. int4_groups=(128,)")
        if groups and (4 not in self.candidates or self.narrowest):
            raise SlimkitError("int4_groups needs 4 in candidates and narrowest=False",
                               "add 4 to candidates, or drop int4_groups")
        if not 0.0 < self.budget_ratio <= 1.0:
            raise SlimkitError(f"budget_ratio={self.budget_ratio} is outside (0, 1]",
                               "use the fraction of the layers' fp32 bytes to keep, e.g. 0.25")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return quantize_mixed(model, self, task)

    @classmethod
    def suggest(cls, trial: Any, ctx: SearchContext) -> Mixed:
        """Per-layer widths under a byte budget, or every layer at its narrowest width (the smallest artifact).

        When the search measured per-layer sensitivity for every weight layer, the integer program
        uses it instead of measuring again (its 4-bit drops at group 32; 8 bits is taken as 1/256 of that)."""
        if trial.suggest_categorical("mixed.widths", ["budget", "narrowest"]) == "narrowest":
            return cls(narrowest=True)
        ratio = round(trial.suggest_float("mixed.budget_ratio", 0.2, 0.5, step=0.01), 2)
        names = weight_layers(ctx.task.model)
        known = dict(ctx.sensitivity) if ctx.sensitivity and all(n in ctx.sensitivity for n in names) else None
        activations = trial.suggest_categorical("mixed.activations", ["none", "dynamic"])  # int8 x int8 8-bit layers
        # int4 at group 128 as well as 32: 4.5 instead of 6 bits a weight, bytes the solver can spend on 8-bit layers
        groups = trial.suggest_categorical("mixed.int4_groups", ["32", "32+128"])
        return cls(budget_ratio=ratio, sensitivity=known, activations=activations,
                   int4_groups=(128,) if groups == "32+128" else ())


    def __hash__(self) -> int:
        return hash(self.to_json())


def layer_bytes(layer: nn.Module, bits: int, group_size: int, int4_convs: bool = False) -> int | None:
    """Stored bytes of ``layer``'s weight at ``bits`` (None where that width cannot hold it)."""
    n, k = layer.weight.shape[0], layer.weight[0].numel()
    if bits == 16:
        return 2 * n * k
    if bits == 8:
        return n * k + 4 * n
    if int4_convs and isinstance(layer, nn.Conv2d):
        return n * ((k + 1) // 2) + 8 * n  # BitConv2d: packed codes + scale_pos/scale_neg per channel
    if not isinstance(layer, nn.Linear) or (group_size and k % group_size):
        return None  # int4 is for Linear weights whose input size the group divides (0: one group per row)
    return n * k // 2 + 8 * n * (k // group_size if group_size else 1)


def _int4_group(layer: nn.Module, config: "Mixed") -> int:
    """``config.group_size``; with ``narrowest``, one group per row (per channel): the fewest scale bytes."""
    return 0 if config.narrowest else config.group_size


def options(config: "Mixed") -> list[tuple[str, int, int | None]]:
    """The per-layer choices as ``(cost key, bits, extra int4 group or None)``, narrowest width first.

    ``"4"`` is int4 at ``group_size`` (or the conv form), ``"4g128"`` int4 at group 128 (Linear only)."""
    out: list[tuple[str, int, int | None]] = []
    for b in sorted(config.candidates):
        out.append((str(b), b, None))
        if b == 4:
            out += [(f"4g{g}", 4, g) for g in sorted(config.int4_groups)]
    return out


def option_bytes(layer: nn.Module, option: tuple[str, int, int | None], config: "Mixed") -> int | None:
    """Stored bytes of ``layer`` at ``option`` (None: not available to it)."""
    _, bits, group = option
    if group is not None:
        return layer_bytes(layer, 4, group) if isinstance(layer, nn.Linear) else None
    return layer_bytes(layer, bits, _int4_group(layer, config), config.int4_convs)


def solve(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float | None]], budget: float) -> list[int]:
    """Multiple-choice knapsack: one option per item, least total cost with total size <= budget.

    ``costs[i][j]`` / ``sizes[i][j]`` of option ``j`` of item ``i`` (size None: not available).
    Returns the chosen option per item; raises SlimkitError when even the smallest options do not fit.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # heavy, imported when used (scipy)

    index = [(i, j) for i, row in enumerate(sizes) for j, s in enumerate(row) if s is not None]
    smallest = sum(min(s for s in row if s is not None) for row in sizes)
    if smallest > budget + 1e-9:
        raise SlimkitError(f"the byte budget {budget:,.0f} is below the smallest possible size {smallest:,.0f}",
                           "raise budget_ratio or add a smaller candidate width")
    c = np.array([costs[i][j] for i, j in index], dtype=np.float64)
    one = np.zeros((len(sizes), len(index)))
    for v, (i, _) in enumerate(index):
        one[i, v] = 1.0
    size_row = np.array([[sizes[i][j] for i, j in index]], dtype=np.float64)
    constraints = [LinearConstraint(one, 1, 1), LinearConstraint(size_row, -np.inf, budget)]
    res = milp(c, constraints=constraints, integrality=np.ones(len(index)), bounds=Bounds(0, 1))
    if res.x is None:
        raise SlimkitError(f"the bit-width integer program found no solution ({res.message})",
                           "raise budget_ratio")
    chosen = [0] * len(sizes)
    for v, (i, j) in enumerate(index):
        if res.x[v] > 0.5:
            chosen[i] = j
    return chosen


def greedy(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[float | None]], budget: float) -> list[int]:
    """The usual heuristic, for comparison: start at the largest option of every item and keep taking
    the step down with the least added cost per byte saved until the budget holds."""
    chosen = [max((j for j, s in enumerate(row) if s is not None), key=lambda j: row[j]) for row in sizes]
    total = sum(sizes[i][j] for i, j in enumerate(chosen))
    while total > budget:
        best = None
        for i, row in enumerate(sizes):
            for j, s in enumerate(row):
                saved = sizes[i][chosen[i]] - s if s is not None else 0
                if saved > 0:
                    rate = (costs[i][j] - costs[i][chosen[i]]) / saved
                    if best is None or rate < best[0]:
                        best = (rate, i, j)
        if best is None:
            raise SlimkitError("greedy: budget cannot be met", "raise the budget")
        total -= sizes[best[1]][chosen[best[1]]] - sizes[best[1]][best[2]]
        chosen[best[1]] = best[2]
    return chosen


def _costs(model: nn.Module, config: Mixed, task: Task, names: list[str]) -> dict[str, dict[str, float]]:
    """Predicted drop per option (key of :func:`options`) per layer (16 bits: 0)."""
    out: dict[str, dict[str, float]] = {"16": {n: 0.0 for n in names}}
    if len(options(config)) == 1 or config.narrowest:  # nothing to choose: no measurement
        keys = [str(b) for b in WIDTHS] + [key for key, _, _ in options(config)]
        return {key: {n: 0.0 for n in names} for key in keys}
    given = {n: v for n, v in (config.sensitivity or {}).items() if n in names}
    if given:
        out["4"] = {n: max(0.0, float(v)) for n, v in given.items()}
        out["8"] = {n: v / 256 for n, v in out["4"].items()}
    for key, per_layer in (config.measured or {}).items():
        out.setdefault(str(key), {}).update({n: max(0.0, float(v)) for n, v in per_layer.items() if n in names})
    for option in options(config):
        key, bits, group = option
        if bits == 16:
            continue
        usable = names if group is None else [n for n in names  # only where that group can store the layer
                                              if option_bytes(model.get_submodule(n), option, config) is not None]
        missing = [n for n in usable if n not in out.get(key, {})]  # e.g. layers a factorization created
        if missing:
            sens = layer_sensitivity(model, task, kind="quantize", bits=bits, layers=missing, measure=config.measure,
                                     group_size=config.group_size if group is None else group)
            out.setdefault(key, {}).update({n: max(0.0, v) for n, v in sens.items()})  # noise is not a gain
    return out


def measure_costs(model: nn.Module, config: Mixed, task: Task) -> dict[str, dict[str, float]]:
    """The per-layer costs ``config`` would measure, as ``Mixed(measured=...)`` takes them back."""
    names, _ = target_layers(model, config.targets, config.exclude, allow_conv=True)
    costs = _costs(model, dataclasses.replace(config, measured=None), task, names)
    return {key: v for key, v in costs.items() if key != "16"}


def quantize_mixed(model: nn.Module, config: Mixed, task: Task) -> nn.Module:
    """The registered handler: measure, solve, swap each layer for its chosen stored form."""
    names, skipped = target_layers(model, config.targets, config.exclude, allow_conv=True)
    opts = options(config)
    layers = {n: model.get_submodule(n) for n in names}
    sizes = [[option_bytes(layers[n], o, config) for o in opts] for n in names]
    if any(all(s is None for s in row) for row in sizes):
        bad = names[next(i for i, row in enumerate(sizes) if all(s is None for s in row))]
        raise SlimkitError(f"layer {bad!r} has no width among candidates {sorted(config.candidates)}",
                           "add 8 or 16 to candidates")
    costs_by_key = _costs(model, config, task, names)
    costs = [[costs_by_key.get(key, {}).get(n, 0.0) for key, _, _ in opts] for n in names]  # absent: option unavailable
    fp32 = sum(4 * layers[n].weight.numel() for n in names)
    budget = config.budget_ratio * fp32
    if config.narrowest:
        choice = [next(j for j, size in enumerate(row) if size is not None) for row in sizes]
    else:
        choice = solve(costs, sizes, budget)
    bits = {n: opts[j][1] for n, j in zip(names, choice)}
    groups = {n: _int4_group(layers[n], config) if opts[j][2] is None else opts[j][2]
              for n, j in zip(names, choice) if opts[j][1] == 4 and isinstance(layers[n], nn.Linear)}
    quantize_embeddings(model, config, skipped)
    for n, b in bits.items():
        layer = layers[n]
        if b == 16:
            new = HalfConv2d.from_float(layer) if isinstance(layer, nn.Conv2d) else HalfLinear.from_float(layer)
        elif isinstance(layer, nn.Conv2d):
            new = int4_per_channel(layer) if b == 4 else QuantConv2d.from_float(layer, activations=config.activations)
        elif b == 4:
            new = QuantLinear.from_float(layer, bits=4, group_size=groups[n])
        else:
            new = QuantLinear.from_float(layer, bits=8, activations=config.activations)
        set_submodule(model, n, new)
    used = sum(sizes[i][j] for i, j in enumerate(choice))
    add_record(model, MixedRecord(config.type_name, config.to_dict(), skipped,
                                  layers=[n for n, b in bits.items() if b < 16], sensitivity=costs_by_key, bits=bits,
                                  group_sizes=groups, budget_bytes=budget, weight_bytes=used, fp32_weight_bytes=fp32,
                                  predicted_drop=float(sum(costs[i][j] for i, j in enumerate(choice)))))
    log.info("mixed precision: %s", bits)
    return model.eval()


__all__ = ["Mixed", "greedy", "layer_bytes", "measure_costs", "option_bytes", "options", "quantize_mixed", "solve"]
