"""Hidden-size pruning of LSTM / GRU layers: a hidden unit is removed with its rows in every gate.

A unit ``j`` of an LSTM owns row ``j`` of each of the four gate blocks (``i, f, g, o``; GRU: ``r, z,
n``) in ``weight_ih`` / ``weight_hh`` / biases, column ``j`` of ``weight_hh``, and column ``j`` of
the next stacked layer's ``weight_ih`` (``d * H + j`` per direction). With those rows zeroed the
unit's state stays exactly zero from a zero start, so removing it is exact: the pruned layer equals
the masked one. One set of units is kept across the stack and both directions, so ``h_n`` keeps a
single layout.

The layers that read the recurrent layer's outputs (``out``, ``h_n``, ``c_n``) are found by a probe:
every other weight layer's output is frozen to its clean value, the recurrent outputs are perturbed,
and the weight layers whose inputs change are its direct readers. Each must be a Linear, a plain
Conv or another recurrent layer reading ``k * H`` features laid out as ``c % H == j`` (``out``,
``out`` flattened over time, ``h_n[-1]``, both directions concatenated); its columns go with the
unit. Anything else (a LayerNorm, the model's output itself) keeps the hidden size, with the reason.
Every pruned layer is then verified like a channel group: the pruned model must equal the original
with those units masked on the calibration inputs, or it is restored.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimkit.measure._call import tensors
from slimkit.prune.group_check import VERIFY_TOLERANCE, first_line

_GATES = {nn.LSTM: 4, nn.GRU: 3}


@dataclasses.dataclass
class RecurrentPruning:
    """What the pass did: kept units per recurrent layer, and layers left whole with why."""

    kept: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def prune_recurrent(model: nn.Module, amount: float, inputs: tuple, *, ignored: set[str],
                    round_to: int | None = 1) -> RecurrentPruning:
    """Remove ``amount`` of the hidden units of every LSTM/GRU in ``model`` (in place) that can be proven safe."""
    result = RecurrentPruning()
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, (nn.RNNBase, nn.RNNCellBase)) or name in ignored:
            continue
        reason = _reason(layer)
        drop = _count(layer.hidden_size, amount, round_to) if not reason else 0
        if reason or not drop:
            result.skipped[name] = reason or f"hidden size {layer.hidden_size} kept: {amount:.2f} of it rounds to 0 units"
            continue
        keep = _keep(layer, drop)
        readers, reason = _readers(model, name, inputs)
        if reason:
            result.skipped[name] = reason
            continue
        masked = _masked(model, name, keep)
        backup = {n: copy.deepcopy(model.get_submodule(n)) for n in (name, *readers)}
        try:
            _shrink(model, name, keep, readers)
            reason = _differs(model, masked, inputs)
        except Exception as exc:  # noqa: BLE001 - a reader that cannot take fewer columns: keep the size
            reason = f"pruning its hidden size breaks the forward pass ({first_line(exc)})"
        if reason:
            for n, module in backup.items():
                _set(model, n, module)
            result.skipped[name] = reason
            continue
        result.kept[name] = keep
    return result


def _reason(layer: nn.Module) -> str:
    if isinstance(layer, nn.RNNCellBase):
        return (f"{type(layer).__name__}: the model's own code carries its state between calls, so its hidden size "
                "is kept")
    if type(layer) not in _GATES:
        return f"{type(layer).__name__}: only LSTM and GRU hidden sizes are pruned"
    if getattr(layer, "proj_size", 0):
        return "LSTM with proj_size: hidden size kept"
    return ""


def _count(hidden: int, amount: float, round_to: int | None) -> int:
    drop = int(hidden * amount)
    drop -= drop % (round_to or 1)
    return min(drop, hidden - 1)


def _keep(layer: nn.RNNBase, drop: int) -> list[int]:
    """The units with the largest gate rows (L2 over every layer, direction and gate), in order."""
    h, gates = layer.hidden_size, _GATES[type(layer)]
    score = torch.zeros(h)
    for pname, p in layer.named_parameters():
        if pname.startswith(("weight_ih", "weight_hh", "bias_")):
            rows = p.detach().float().reshape(gates, h, -1)  # (G, H, fan_in or 1)
            score += rows.pow(2).sum(dim=(0, 2))
    return sorted(torch.argsort(score, descending=True)[: h - drop].tolist())


def _readers(model: nn.Module, name: str, inputs: tuple) -> tuple[list[str], str]:
    """The weight layers that read ``name``'s outputs directly, or why the hidden size must stay."""
    layer = model.get_submodule(name)
    h = layer.hidden_size
    weighted = {n: m for n, m in model.named_modules()
                if n != name and not n.startswith(f"{name}.") and not list(m.children())
                and any(True for _ in m.parameters(recurse=False))}
    clean: dict[str, list[torch.Tensor]] = {n: [] for n in weighted}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in weighted}
    calls: dict[str, int] = {}

    def record(n: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:  # copies: later in-place ops must not reach them
            clean[n].append(_map_tensors(output, torch.clone))
            seen[n].append(args[0].clone() if args and isinstance(args[0], torch.Tensor) else None)
        return hook

    def replay(n: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            i = calls[n] = calls.get(n, -1) + 1
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            before = seen[n][i] if i < len(seen[n]) else None
            if first is not None and before is not None and first.shape == before.shape and not torch.equal(first, before):
                changed[n] = (first - before).abs()
            return _map_tensors(clean[n][i], torch.clone) if i < len(clean[n]) else output
        return hook

    def perturb(module: nn.Module, args: tuple, output: Any) -> Any:
        g = torch.Generator().manual_seed(0)
        return _map_tensors(output, lambda t: t + torch.rand(t.shape, generator=g, dtype=t.dtype) + 0.5)

    changed: dict[str, torch.Tensor] = {}
    hooks = [weighted[n].register_forward_hook(record(n)) for n in weighted]
    try:
        with torch.no_grad():
            base = [t.clone() for t in tensors(model(*inputs))]
            for hk in hooks:
                hk.remove()
            hooks = [weighted[n].register_forward_hook(replay(n)) for n in weighted]
            hooks.append(layer.register_forward_hook(perturb))
            probed = tensors(model(*inputs))
    except Exception as exc:  # noqa: BLE001 - the probe itself does not run: do not guess
        return [], f"its readers cannot be traced ({first_line(exc)}): hidden size kept"
    finally:
        for hk in hooks:
            hk.remove()
    if any(not torch.equal(a, b) for a, b in zip(base, probed)):
        return [], "its output reaches the model's output without a weight layer between: hidden size kept"
    readers = []
    for n, diff in changed.items():
        module = weighted[n]
        width = _in_width(module)
        if width is None:
            return [], f"its output reaches {n} ({type(module).__name__}), which mixes or scales its features: hidden size kept"
        if width % h:
            return [], f"{n} reads {width} features, not a multiple of the hidden size {h}: hidden size kept"
        readers.append(n)
    if not readers:
        return [], "no weight layer reads its output: hidden size kept"
    return readers, ""


def _in_width(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return module.in_channels
    if isinstance(module, tuple(_GATES)) and not getattr(module, "proj_size", 0):
        return module.input_size
    return None


def _map_tensors(output: Any, fn: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, nn.utils.rnn.PackedSequence):
        return output._replace(data=fn(output.data))
    if isinstance(output, tuple):
        return tuple(_map_tensors(o, fn) for o in output)
    return output


def _masked(model: nn.Module, name: str, keep: list[int]) -> nn.Module:
    """A copy of ``model`` whose recurrent layer ``name`` has every removed unit's gate rows zeroed."""
    masked = copy.deepcopy(model).eval()
    layer = masked.get_submodule(name)
    h, gates = layer.hidden_size, _GATES[type(layer)]
    drop = torch.tensor(sorted(set(range(h)) - set(keep)))
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname.startswith(("weight_ih", "weight_hh", "bias_")):
                p.view(gates, h, -1)[:, drop] = 0.0
    return masked


def _shrink(model: nn.Module, name: str, keep: list[int], readers: list[str]) -> None:
    """Replace the recurrent layer by one of ``len(keep)`` units and cut its readers' columns."""
    old = model.get_submodule(name)
    h, gates, k = old.hidden_size, _GATES[type(old)], len(keep)
    directions = 2 if old.bidirectional else 1
    kept = torch.tensor(keep)
    rows = torch.cat([kept + g * h for g in range(gates)])  # (G*k,) gate rows kept
    stacked = torch.cat([kept + d * h for d in range(directions)])  # (D*k,) next layer's input columns kept
    new = type(old)(old.input_size, k, old.num_layers, bias=old.bias, batch_first=old.batch_first,
                    dropout=old.dropout, bidirectional=old.bidirectional)
    with torch.no_grad():
        for pname, p in new.named_parameters():
            src = getattr(old, pname).detach()
            src = src[rows]
            if pname.startswith("weight_hh"):
                src = src[:, kept]
            elif pname.startswith("weight_ih") and not pname.startswith("weight_ih_l0"):
                src = src[:, stacked]
            p.copy_(src)
    _set(model, name, new.to(old.weight_ih_l0.device).train(old.training))
    for n in readers:
        _cut_columns(model.get_submodule(n), h, kept)


def _cut_columns(reader: nn.Module, h: int, kept: torch.Tensor) -> None:
    """Keep the input columns ``c`` of ``reader`` whose ``c % h`` is a kept unit."""
    width = _in_width(reader)
    columns = torch.tensor([c for c in range(width) if c % h in set(kept.tolist())])
    with torch.no_grad():
        if isinstance(reader, nn.RNNBase):
            for pname in [p for p, _ in reader.named_parameters() if p.startswith("weight_ih_l0")]:
                setattr(reader, pname, nn.Parameter(getattr(reader, pname).detach()[:, columns]))
            reader.input_size = len(columns)
            reader._init_flat_weights()
        else:
            reader.weight = nn.Parameter(reader.weight.detach()[:, columns])
            if isinstance(reader, nn.Linear):
                reader.in_features = len(columns)
            else:
                reader.in_channels = len(columns)


def _differs(model: nn.Module, masked: nn.Module, inputs: tuple) -> str:
    with torch.no_grad():
        pruned = [t.float() for t in tensors(model(*inputs))]
        reference = [t.float() for t in tensors(masked(*inputs))]
    for a, b in zip(pruned, reference):
        if a.shape != b.shape:
            return f"pruning its hidden size changes an output's shape {tuple(b.shape)} -> {tuple(a.shape)}: kept"
        diff = float((a - b).abs().max()) / (float(b.abs().max()) or 1.0)
        if diff > VERIFY_TOLERANCE:
            return (f"the pruned model is not the original with these units masked (relative difference {diff:.2g}): "
                    "hidden size kept")
    return ""


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
