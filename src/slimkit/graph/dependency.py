"""Dependency groups: the sets of layers whose channels must be removed together.

A residual addition ties the output channels of every conv that writes into it; a depthwise conv
ties its input and output channels; q/k/v and the output projection share the heads. We build the
graph with Torch-Pruning's tracer (docs/architecture.md, design notes, says why) and add what slimkit
needs around it: which groups are safe to touch, why the others are not, and names a person
can read in a report.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from slimkit.core.errors import SlimkitError

#: Layer types whose parameters the dependency graph knows how to slice.
KNOWN_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding, nn.MultiheadAttention, nn.LSTM,
)


@dataclasses.dataclass
class GroupView:
    """A readable summary of one dependency group."""

    root: str  # module whose output channels define the group
    channels: int  # channels in the group before pruning
    members: list[str]  # every module (or parameter) the group touches
    blocked: str | None = None  # why slimkit will not prune this group


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module or parameter) -> dotted name, for readable reports."""
    names: dict[int, str] = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    return names


def resolve_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Module names matching each entry exactly or as a full regex (``ignored=("classifier.*",)``)."""
    all_names = [n for n, _ in model.named_modules() if n]
    chosen: list[str] = []
    for pattern in patterns:
        if pattern in all_names:
            chosen.append(pattern)
            continue
        try:
            rx = re.compile(pattern)
        except re.error:
            continue
        chosen.extend(n for n in all_names if rx.fullmatch(n))
    return sorted(set(chosen))


#: Layers the graph does not slice: their gates are grouped by ``slimkit.prune.recurrent_hidden``.
RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def kept_layers(model: nn.Module) -> dict[str, str]:
    """Every layer channel pruning must leave whole -> why: custom layers and recurrent ones."""
    found = custom_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, RECURRENT):
            found[name] = (f"recurrent layer {type(module).__name__}: the channels it reads are kept (an LSTM/GRU "
                           "hidden size is pruned on its own, gates grouped)")
    return found


def untraceable_roots(graph: Any, roots: list[nn.Module], names: dict[int, str],
                      check: Callable[[Any], Any] | None = None) -> dict[str, str]:
    """Root layers whose dependency group the tracer cannot build (an index mapping it gets wrong), or
    that ``check(group)`` (e.g. the pruner's importance) fails on -> why."""
    found = {}
    for module in roots:
        width = module.weight.shape[0] if isinstance(getattr(module, "weight", None), torch.Tensor) else 1
        try:  # every channel index: a mapping can be wrong only past some index (pixel shuffle, split)
            group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels,
                                            idxs=list(range(width)))
            if check is not None:
                check(group)
        except Exception as exc:  # noqa: BLE001 - any failure of the tracer means this group is not ours to prune
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            found[names.get(id(module), "?")] = (
                "kept unpruned: the dependency tracer cannot follow its channels through the ops after it (a "
                f"reshape, pixel shuffle, split or recurrent input it maps wrongly) [{type(exc).__name__}: {first}]")
    return found


def custom_layers(model: nn.Module) -> dict[str, str]:
    """Layers with parameters of their own that the graph cannot slice -> reason.

    Modules from torch and HF transformers are understood (transformers' loose parameters such as
    ViT's class token are sliced along their last axis with the hidden size); anything else that
    owns parameters directly is a user's custom layer and is left intact.
    """
    found = {}
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own or isinstance(module, KNOWN_TYPES):
            continue
        package = type(module).__module__.split(".")[0]
        if package in ("torch", "transformers"):
            continue
        found[name] = f"custom layer {type(module).__name__} owns parameters {', '.join(own)} the graph cannot slice"
    return found


def execution_order(model: nn.Module, example: tuple[Any, ...]) -> list[str]:
    """Names of the Conv/Linear layers in the order one forward pass on ``example`` calls them."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
             for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for h in hooks:
            h.remove()
    return list(dict.fromkeys(order))


def output_layer(model: nn.Module, example: tuple[Any, ...]) -> str | None:
    """Name of the last Conv/Linear that runs: its output width is the model's output width."""
    order = execution_order(model, example)
    return order[-1] if order else None


def torch_pruning() -> Any:
    """The Torch-Pruning module, or a one-line error saying how to install it."""
    try:
        import torch_pruning as tp  # optional (torch_pruning, extra 'prune'): imported when used
    except ImportError:
        raise SlimkitError("structured pruning needs the torch-pruning package",
                           "pip install 'slimkit[prune]'") from None
    return tp


def dependency_graph(model: nn.Module, example: tuple[Any, ...]) -> Any:
    """The traced dependency graph of ``model`` on ``example``."""
    tp = torch_pruning()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters")
        return tp.DependencyGraph().build_dependency(model, example_inputs=tp_inputs(example))


def group_members(group: Any, names: dict[int, str]) -> list[str]:
    """Names of every layer or parameter a Torch-Pruning group touches (ordered, unique)."""
    seen: dict[str, None] = {}
    for dep, _ in group:
        target = dep.target.module
        seen.setdefault(names.get(id(target), type(target).__name__), None)
    return list(seen)


def blocked_reason(group: Any, names: dict[int, str], *, frozen: dict[int, str], hidden: bool) -> str | None:
    """Why a group must not be pruned, or ``None``.

    ``frozen`` maps id(module or parameter) -> reason (custom layers, blocked heads). A group that
    reaches an ``nn.Embedding`` is the transformer's hidden width (the residual stream): pruning
    it is opt-in (``hidden=True``) because it touches every layer and the output width.
    """
    for dep, _ in group:
        target = dep.target.module
        if id(target) in frozen:
            return frozen[id(target)]
        if not hidden and isinstance(target, nn.Embedding):
            return f"hidden width (reaches embedding {names.get(id(target), '?')}); pass hidden=True to prune it"
        if not hidden and isinstance(target, nn.Parameter) and names.get(id(target), "").count("embed"):
            return f"hidden width (reaches {names.get(id(target))}); pass hidden=True to prune it"
    return None


def list_groups(model: nn.Module, example: tuple[Any, ...], *, hidden: bool = False) -> list[GroupView]:
    """Every dependency group rooted at a Conv/Linear, with the reason it is blocked if it is."""
    graph = dependency_graph(model, example)
    names = module_names(model)
    frozen = frozen_ids(model, kept_layers(model))
    views = []
    for group in graph.get_all_groups():
        root_module = group[0].dep.target.module
        channels = len(group[0].idxs)
        views.append(GroupView(root=names.get(id(root_module), "?"), channels=channels,
                               members=group_members(group, names),
                               blocked=blocked_reason(group, names, frozen=frozen, hidden=hidden)))
    return views


def frozen_ids(model: nn.Module, reasons: dict[str, str]) -> dict[int, str]:
    """id(module and each of its parameters) -> reason, for :func:`blocked_reason`."""
    frozen: dict[int, str] = {}
    for name, reason in reasons.items():
        module = model.get_submodule(name)
        frozen[id(module)] = reason
        for p in module.parameters():
            frozen[id(p)] = reason
    return frozen


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every Conv/Linear (hidden size of every LSTM/GRU): what channel pruning changes."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
        elif isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            widths[name] = m.hidden_size
    return widths


def tp_inputs(example: tuple[Any, ...]) -> Any:
    # Torch-Pruning calls model(*inputs) for a tuple and model(inputs) otherwise.
    return example if len(example) != 1 else example[0]
