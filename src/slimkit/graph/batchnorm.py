"""BatchNorm folding: at inference a BatchNorm is a per-channel affine map, so ``bn(conv(x))`` is one conv.

The fold removes a full pass over the activation tensor and changes no output beyond float
rounding (checked to 1e-5 after every fold). Pairs are found with ``torch.fx`` when the model
traces (a conv whose *only* user is the BN), and otherwise by module order (a BN registered right
after a conv of the same width, e.g. HF ResNet, which fx cannot trace) confirmed by a forward pass
that the BN really consumes that conv's output; either way the folded model is compared with the
original and any pair that changes the output is put back. Used by fusion and by QAT.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from slimkit.core.editing import set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import layer_class

log = logging.getLogger("slimkit.graph")

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
TOLERANCE = 1e-5


@layer_class("architecture.FoldedNorm")
class FoldedNorm(nn.Identity):
    """Where a BatchNorm was: its scale and shift now live in the conv/linear before it."""

    def spec(self) -> dict[str, Any]:
        return {}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "FoldedNorm":
        return cls()


def _folded_class(base: type[nn.Module], name: str) -> type[nn.Module]:
    """A subclass of ``base`` that always has a bias (the folded shift), rebuildable from its spec."""

    def spec(self: nn.Module) -> dict[str, Any]:
        if isinstance(self, nn.Linear):
            return {"in_features": self.in_features, "out_features": self.out_features}
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "padding_mode": self.padding_mode}

    def empty(cls: type[nn.Module], spec: dict[str, Any]) -> nn.Module:
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        return cls(**args, bias=True)

    cls = type(name, (base,), {"spec": spec, "empty": classmethod(empty), "__doc__": f"{base.__name__} with a folded BatchNorm."})
    return layer_class(f"architecture.{name}")(cls)


FoldedConv1d = _folded_class(nn.Conv1d, "FoldedConv1d")
FoldedConv2d = _folded_class(nn.Conv2d, "FoldedConv2d")
FoldedConv3d = _folded_class(nn.Conv3d, "FoldedConv3d")
FoldedLinear = _folded_class(nn.Linear, "FoldedLinear")
_FOLDED = {nn.Conv1d: FoldedConv1d, nn.Conv2d: FoldedConv2d, nn.Conv3d: FoldedConv3d, nn.Linear: FoldedLinear}


@torch.no_grad()
def folded_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A new conv/linear computing ``bn(layer(x))`` in eval mode."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    cls = _FOLDED[type(layer)]
    out = cls.empty(cls.spec(layer)).to(layer.weight.device, layer.weight.dtype)  # type: ignore[attr-defined]
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)  # per output channel
    out.weight.copy_(layer.weight * scale.reshape(shape))
    bias = layer.bias if layer.bias is not None else torch.zeros_like(bn.running_mean)
    out.bias.copy_(bias * scale + shift)
    return out


def find_pairs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[tuple[str, str]]:
    """``(layer name, bn name)`` pairs where the BN reads the layer's output."""
    try:
        return _fx_pairs(model)
    except Exception as exc:  # fx cannot trace data-dependent Python (HF models check shapes)
        log.info("fuse: torch.fx could not trace the model (%s); pairing by module order", type(exc).__name__)
        return _order_pairs(model, example)


def _fx_pairs(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and type(modules.get(src.target)) in _FOLDED
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    return pairs


def _order_pairs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[tuple[str, str]]:
    named = [(n, m) for n, m in model.named_modules() if n]
    guesses = [(a, b) for (a, la), (b, lb) in zip(named, named[1:])
               if type(la) in _FOLDED and isinstance(lb, _BN)
               and (la.out_features if isinstance(la, nn.Linear) else la.out_channels) == lb.num_features]
    outputs: dict[str, int] = {}
    inputs: dict[str, int] = {}
    hooks = []
    for a, b in guesses:
        hooks.append(model.get_submodule(a).register_forward_hook(
            lambda m, i, o, a=a: outputs.__setitem__(a, o.data_ptr())))
        hooks.append(model.get_submodule(b).register_forward_pre_hook(
            lambda m, i, b=b: inputs.__setitem__(b, i[0].data_ptr())))
    try:
        with torch.inference_mode():
            model.eval()(*example)
    finally:
        for h in hooks:
            h.remove()
    return [(a, b) for a, b in guesses if a in outputs and outputs[a] == inputs.get(b)]


def fold_batchnorm(model: nn.Module, example: tuple[torch.Tensor, ...] | torch.Tensor) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with every foldable BatchNorm folded; returns it and the folded BN names.

    The result is checked against ``model`` on ``example``; a pair whose fold changes the output by
    more than :data:`TOLERANCE` (relative to the output's scale) is left unfolded.
    """
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    model = model.eval()
    with torch.inference_mode():
        reference = _first(model(*example))
    pairs = find_pairs(model, example)
    out = copy.deepcopy(model)
    for layer, bn in pairs:
        _fold_pair(out, layer, bn)
    if pairs and not _close(reference, out, example):  # find the culprit(s) one pair at a time
        out, kept = copy.deepcopy(model), []
        for layer, bn in pairs:
            trial = copy.deepcopy(out)
            _fold_pair(trial, layer, bn)
            if _close(reference, trial, example):
                out = trial
                kept.append((layer, bn))
            else:
                log.warning("fuse: folding %s into %s changes the output; left as is", bn, layer)
        pairs = kept
    return out.eval(), [bn for _, bn in pairs]


def _fold_pair(model: nn.Module, layer: str, bn: str) -> None:
    set_submodule(model, layer, folded_layer(model.get_submodule(layer), model.get_submodule(bn)))
    set_submodule(model, bn, FoldedNorm())


def _close(reference: torch.Tensor, model: nn.Module, example: tuple[torch.Tensor, ...]) -> bool:
    with torch.inference_mode():
        got = _first(model(*example))
    scale = max(1.0, float(reference.abs().max()))
    return bool((got - reference).abs().max() <= TOLERANCE * scale)


def _first(output: Any) -> torch.Tensor:
    """The main output tensor of a module (HF models return ModelOutput objects)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        return _first(output[0])
    raise SlimkitError(f"cannot compare outputs of type {type(output).__name__}", "return a tensor from forward")
