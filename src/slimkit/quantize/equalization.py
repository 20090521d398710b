"""``quantize.CrossLayerEqualization``: data-free range equalization of consecutive conv/linear pairs
(Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction").

Per-tensor int8 loses the channels whose weights are much smaller than the tensor's largest (one
scale for all). For ``y = W2 relu(W1 x + b1)``, ``relu(x / s) = relu(x) / s`` for s > 0, so output
channel i of W1 (and b1) can be divided by s_i and input channel i of W2 multiplied by it without
changing the function. With r1_i, r2_i the ranges of those channels, ``s_i = sqrt(r1_i r2_i) / r2_i``
gives both the range sqrt(r1_i r2_i); pairs in a chain are swept until the scales settle.

A pair is ``Conv/Linear -> [BatchNorm] -> [ReLU | pool | dropout | identity]* -> Conv/Linear`` where
each output feeds only the next op (found on the torch.fx graph); depthwise convs take part on either
side (conv -> depthwise -> pointwise chains). A BatchNorm inside a pair is folded into the first layer
first. Skipped, and listed with the reason: branches and residual adds, grouped (non-depthwise)
convs, reshapes, non-homogeneous activations, and ReLU6: ``min(relu(x/s), 6) * s`` clips at 6s, not 6,
for every s != 1, so no rescaling keeps a ReLU6 pair's function; such pairs are left as they are.
The stage is "fuse": it only rescales float weights, before a quantize step.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from slimkit.core.config import BaseConfig, technique
from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.record import ReportSection, StepRecord, StepView, add_record
from slimkit.core.registry import SearchContext
from slimkit.core.task import Task
from slimkit.graph.batchnorm import FoldedNorm, folded_layer

WEIGHTED = (nn.Conv2d, nn.Linear)
#: Ops that commute with a positive per-channel scale: f(x / s) = f(x) / s.
HOMOGENEOUS_MODULES = (nn.ReLU, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d)
HOMOGENEOUS_METHODS = ("relu", "relu_")
RELU6 = "ReLU6 is not positively homogeneous (rescaling moves its clip at 6): pair left as is"
_SETTLED = 1e-4  # stop sweeping once every scale is within this of 1


@technique("quantize.CrossLayerEqualization", stage="fuse")
@dataclasses.dataclass(frozen=True)
class CrossLayerEqualization(BaseConfig):
    """Equalize the per-channel weight ranges of consecutive conv/linear pairs (the float function is kept).

    ``iterations``: at most this many sweeps over the pairs (a chain of pairs shares layers).
    """

    version: ClassVar[int] = 1
    iterations: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise SlimkitError(f"iterations={self.iterations!r} is not a positive integer", "use e.g. 20")

    def apply_to(self, model: nn.Module, task: Task | None) -> nn.Module:
        return equalize(model, self)

    @classmethod
    def report_section(cls, report: ReportSection, record: StepRecord, view: StepView) -> None:
        if not isinstance(record, EqualizationRecord):
            return
        report.heading(f"{record.technique}: {len(record.pairs)} pair(s) equalized, "
                       f"{len(record.folded)} BatchNorm(s) folded, {record.sweeps} sweep(s)")
        if record.pairs:
            report.table(["first", "second", "largest scale", "smallest scale"],
                         [[a, b, record.scales[f"{a}->{b}"][0], record.scales[f"{a}->{b}"][1]] for a, b in record.pairs])
        if record.skipped:
            report.table(["layer", "reason it was not equalized"], [[n, why] for n, why in record.skipped.items()])


@dataclasses.dataclass
class EqualizationRecord(StepRecord):
    """The equalized pairs (first, second), BatchNorms folded into them, and each pair's total scale range."""

    pairs: list[list[str]] = dataclasses.field(default_factory=list)
    folded: list[str] = dataclasses.field(default_factory=list)
    scales: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    sweeps: int = 0


@dataclasses.dataclass
class _Pair:
    first: str
    second: str
    norm: str | None  # a BatchNorm between them, folded into ``first``


def find_pairs(model: nn.Module) -> tuple[list[_Pair], dict[str, str]]:
    """Equalizable pairs, and every Conv2d/Linear in no pair with why (from the fx graph)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - data-dependent Python: fx cannot see the pairs
        why = f"the model does not trace with torch.fx ({type(exc).__name__}), so no pair can be proven"
        return [], {n: why for n in layers}
    modules = dict(model.named_modules())
    pairs: list[_Pair] = []
    reasons: dict[str, str] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), WEIGHTED):
            found = _follow(node, modules)
            if isinstance(found, str):
                reasons[node.target] = found
            else:
                pairs.append(found)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    shared = {n for n, k in calls.items() if k > 1}
    for n in shared & set(layers):
        reasons[n] = "called more than once in forward (shared weights): rescaling it would change another use"
    for p in pairs:
        if {p.first, p.second, p.norm} & shared and p.first not in shared:
            reasons[p.first] = f"the next layer {p.second!r} is called more than once in forward (shared weights)"
    pairs = [p for p in pairs if not {p.first, p.second, p.norm} & shared]
    paired = {p.first for p in pairs} | {p.second for p in pairs}
    skipped = {n: reasons.get(n, "not called as a module in forward (fx graph)") for n in layers if n not in paired}
    return pairs, skipped


def _follow(node: torch.fx.Node, modules: dict[str, nn.Module]) -> _Pair | str:
    """The pair starting at ``node`` (a Conv2d/Linear call), or why there is none."""
    first, name = modules[node.target], str(node.target)
    if isinstance(first, nn.Conv2d) and first.groups not in (1, first.in_channels):
        return f"grouped conv (groups={first.groups}, not depthwise): its channels do not pair one to one"
    norm, cur = None, node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            where = "its output" if cur is node else f"the output of {cur.name!r} after it"
            return f"{where} is the model's output" if not users else \
                f"{where} feeds {len(users)} ops (a branch or residual add)"
        nxt = users[0]
        if nxt.op == "output":
            return "its output is the model's output" if cur is node else f"{cur.name!r} after it is the model's output"
        if nxt.target in (operator.add, torch.add, operator.iadd):
            return "an add (residual) follows it: not a channel-wise positively homogeneous op"
        if nxt.args and nxt.args[0] is not cur:  # e.g. mul(other, x): the chain must carry this tensor first
            return f"{nxt.name!r} does not take this layer's output as its first input"
        if nxt.op == "call_module":
            m = modules[nxt.target]
            if isinstance(m, WEIGHTED):
                return _check_second(name, first, str(nxt.target), m, norm)
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                if cur is not node:
                    return f"BatchNorm {nxt.target!r} is not right after the layer, so it cannot be folded"
                if m.running_var is None or type(first) not in (nn.Conv2d, nn.Linear):
                    return f"BatchNorm {nxt.target!r} cannot be folded (no running statistics or a custom layer)"
                norm = str(nxt.target)
            elif isinstance(m, (nn.ReLU6, nn.Hardtanh)):
                return RELU6
            elif not isinstance(m, HOMOGENEOUS_MODULES):
                return f"{type(m).__name__} {nxt.target!r} follows it and is not positively homogeneous"
        elif nxt.op == "call_function" and nxt.target in (F.relu6, F.hardtanh):
            return RELU6
        elif not ((nxt.op == "call_function" and nxt.target in HOMOGENEOUS_FUNCTIONS)
                  or (nxt.op == "call_method" and nxt.target in HOMOGENEOUS_METHODS)):
            what = getattr(nxt.target, "__name__", str(nxt.target))
            return f"{what!r} follows it: not a channel-wise positively homogeneous op"
        cur = nxt


def _check_second(name: str, first: nn.Module, second_name: str, second: nn.Module, norm: str | None) -> _Pair | str:
    width = first.out_channels if isinstance(first, nn.Conv2d) else first.out_features
    if isinstance(second, nn.Linear):
        ok = second.in_features == width and isinstance(first, nn.Linear)
    else:
        ok = second.in_channels == width and second.groups in (1, width) and (second.groups == 1
                                                                               or second.out_channels == width)
    if not ok:
        return f"the next layer {second_name!r} does not read its {width} channels one to one (shape or groups)"
    return _Pair(name, second_name, norm)


def _output_range(layer: nn.Module) -> torch.Tensor:
    return layer.weight.detach().abs().flatten(1).amax(1)  # (C,)


def _input_range(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().abs()
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # depthwise: input channel i is filter i
        return w.flatten(1).amax(1)  # (C,)
    return w.transpose(0, 1).flatten(1).amax(1)  # (C,)


@torch.no_grad()
def _rescale(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """One equalization of a pair in place; returns the scales s (C,) it applied."""
    r1, r2 = _output_range(first), _input_range(second)
    s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 * r2) / r2.clamp_min(1e-30), torch.ones_like(r1))  # (C,)
    first.weight.div_(s.reshape(-1, *([1] * (first.weight.dim() - 1))))
    if first.bias is not None:
        first.bias.div_(s)
    if isinstance(second, nn.Conv2d) and second.groups > 1:
        second.weight.mul_(s.reshape(-1, 1, 1, 1))
    else:
        second.weight.mul_(s.reshape(1, -1, *([1] * (second.weight.dim() - 2))))
    return s


def equalize(model: nn.Module, config: CrossLayerEqualization) -> nn.Module:
    """Fold the BatchNorms inside pairs, then sweep the pairs until their scales settle."""
    was_training = model.training
    model.eval()
    pairs, skipped = find_pairs(model)
    for p in pairs:
        if p.norm is not None:
            set_submodule(model, p.first, folded_layer(model.get_submodule(p.first), model.get_submodule(p.norm)))
            set_submodule(model, p.norm, FoldedNorm())
    totals = {f"{p.first}->{p.second}": torch.ones(1) for p in pairs}
    sweeps = 0
    for sweeps in range(1, config.iterations + 1 if pairs else 1):
        worst = 0.0
        for p in pairs:
            s = _rescale(model.get_submodule(p.first), model.get_submodule(p.second))
            key = f"{p.first}->{p.second}"
            totals[key] = totals[key] * s
            worst = max(worst, float((s - 1).abs().max()))
        if worst < _SETTLED:
            break
    model.train(was_training)
    add_record(model, EqualizationRecord(
        config.type_name, config.to_dict(), skipped, pairs=[[p.first, p.second] for p in pairs],
        folded=[p.norm for p in pairs if p.norm], sweeps=sweeps,
        scales={k: [float(v.max()), float(v.min())] for k, v in totals.items()}))
    return model


_HAS_PAIRS: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def has_pairs(model: nn.Module) -> bool:
    """Whether ``model`` has a pair to equalize (traced once per model: every trial asks)."""
    if model not in _HAS_PAIRS:
        _HAS_PAIRS[model] = bool(find_pairs(model)[0])
    return _HAS_PAIRS[model]


def equalization_knob(trial: Any, ctx: SearchContext, prefix: str) -> CrossLayerEqualization | None:
    """``{prefix}.cle``: equalize before a static int8 step (a boolean). Asked only where the model has a pair
    (conv/linear -> [BN] -> ReLU -> conv/linear): a transformer (GELU, residuals) or a ReLU6 network has
    none, and a knob that changes nothing would only cost the search trials."""
    if not has_pairs(ctx.task.model):
        return None
    return CrossLayerEqualization() if trial.suggest_categorical(f"{prefix}.cle", [False, True]) else None
