"""Quantized LSTM / GRU / LSTMCell / GRUCell: each gate matrix an integer ``QuantLinear``, the
recurrence in torch.

A recurrent layer is a few matrices applied at every time step: the input projection (all steps
at once) and the hidden projection (one step at a time). Each becomes a ``StepLinear`` (int8
dynamic on fbgemm, or weight-only int8/int4), so an LSTM that holds most of a speaker encoder's
parameters is stored in int8 instead of staying float. The recurrence loops over time in Python:
a size win first; BENCHMARKS.md has the speed. PackedSequence inputs run a float twin with the
dequantized weights, so their semantics stay torch's own.

On ONNX Runtime (int8 dynamic): an LSTM / GRU exports as the float twin, one ONNX ``LSTM`` / ``GRU``
node that keeps the sequence length dynamic, and the runtime re-quantizes an LSTM's gate matrices to
the same int8 rows (``DynamicQuantizeLSTM``; ORT has no integer GRU, which it lists as float). A
cell exports as its step, two gate MatMuls the runtime quantizes like any Linear.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from slimkit.core.editing import select, set_submodule
from slimkit.core.errors import SlimkitError
from slimkit.core.registry import layer_class
from slimkit.core.runtime_needs import LayerNeeds
from slimkit.quantize.modules import QuantLinear

RECURRENT = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
_GATES = {"LSTM": 4, "GRU": 3}
_NOT_ON_CUDA = "recurrent layers run on torch or ONNX Runtime (the CUDA backend rebuilds Linear layers only)"
_WEIGHT_ONLY_NOT_ON_ORT = ("ONNX Runtime has no weight-only LSTM / GRU kernel (the layer's node would run float); "
                           "torch's weight-only kernels run the gates")


@layer_class("StepLinear")
class StepLinear(QuantLinear):
    """A gate matrix of a quantized recurrent layer: a QuantLinear the CUDA backend cannot run alone."""

    def runtime_needs(self) -> LayerNeeds:
        needs = super().runtime_needs()
        ort = {"onnxruntime": _WEIGHT_ONLY_NOT_ON_ORT} if self.activations == "none" else {}
        return dataclasses.replace(needs, unsupported={**needs.unsupported, "cuda": _NOT_ON_CUDA, **ort})


def recurrent_reason(layer: nn.Module) -> str:
    """Why ``layer`` stays float ("" when it is converted)."""
    if isinstance(layer, nn.LSTM) and layer.proj_size:
        return "LSTM with proj_size is not quantized: kept float"
    if not isinstance(layer, RECURRENT):
        return f"{type(layer).__name__} is not quantized by this technique: kept float"
    return ""


@layer_class("QuantRecurrent")
class QuantRecurrent(nn.Module):
    """An LSTM/GRU (``cell=False``) or LSTMCell/GRUCell (``cell=True``) with quantized gate matrices.

    ``gates[f"ih{suffix}"]``: (G*H, In) input projection, ``gates[f"hh{suffix}"]``: (G*H, H) hidden
    projection, with ``suffix`` ``_l{layer}`` (+ ``_reverse``) as in torch's parameter names, "" for cells.
    """

    def __init__(self, mode: str, input_size: int, hidden_size: int, *, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, bidirectional: bool = False, cell: bool = False, bits: int = 8,
                 group_size: int = 0, activations: str = "dynamic") -> None:
        super().__init__()
        if mode not in _GATES:
            raise SlimkitError(f"recurrent mode {mode!r} is not known", f"use one of {sorted(_GATES)}")
        self.mode, self.input_size, self.hidden_size = mode, input_size, hidden_size
        self.num_layers, self.bias_on, self.batch_first = num_layers, bias, batch_first
        self.directions, self.cell = 2 if bidirectional else 1, cell
        self.quant = {"bits": bits, "group_size": group_size, "activations": activations}
        width = _GATES[mode] * hidden_size
        self.gates = nn.ModuleDict()
        for suffix, fan_in in self._matrices():
            self.gates[f"ih{suffix}"] = StepLinear(fan_in, width, bias=bias, **self._quant(fan_in))
            self.gates[f"hh{suffix}"] = StepLinear(hidden_size, width, bias=bias, **self._quant(hidden_size))
        self._twin: list[nn.Module] = []  # the float twin for PackedSequence inputs (built on first use)

    def _quant(self, fan_in: int) -> dict[str, Any]:
        """A matrix whose fan-in is not a multiple of the group size is quantized per row instead."""
        group = self.quant["group_size"]
        return {**self.quant, "group_size": group if group and fan_in % group == 0 else 0}

    def _matrices(self) -> list[tuple[str, int]]:
        if self.cell:
            return [("", self.input_size)]
        return [(f"_l{layer}{'_reverse' if d else ''}", self.input_size if layer == 0 else self.hidden_size * self.directions)
                for layer in range(self.num_layers) for d in range(self.directions)]

    @classmethod
    def from_float(cls, rnn: nn.Module, *, bits: int = 8, group_size: int = 0,
                   activations: str = "dynamic") -> QuantRecurrent:
        cell = isinstance(rnn, nn.RNNCellBase)
        mode = "LSTM" if isinstance(rnn, (nn.LSTM, nn.LSTMCell)) else "GRU"
        extra = {} if cell else {"num_layers": rnn.num_layers, "batch_first": rnn.batch_first,
                                 "bidirectional": rnn.bidirectional}
        m = cls(mode, rnn.input_size, rnn.hidden_size, bias=rnn.bias, cell=cell, bits=bits, group_size=group_size,
                activations=activations, **extra)
        for suffix, _ in m._matrices():
            for kind in ("ih", "hh"):
                linear = nn.Linear(1, 1, bias=rnn.bias)
                linear.weight = nn.Parameter(getattr(rnn, f"weight_{kind}{suffix}").detach())
                linear.bias = nn.Parameter(getattr(rnn, f"bias_{kind}{suffix}").detach()) if rnn.bias else None
                linear.in_features, linear.out_features = linear.weight.shape[1], linear.weight.shape[0]
                m.gates[f"{kind}{suffix}"] = StepLinear.from_float(linear, **m._quant(linear.in_features))
        return m.eval()

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> QuantRecurrent:
        return cls(**{k: v for k, v in spec.items() if k != "kind"})

    def spec(self) -> dict[str, Any]:
        return {"mode": self.mode, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.bias_on, "batch_first": self.batch_first,
                "bidirectional": self.directions == 2, "cell": self.cell, **self.quant}

    def to_float(self) -> nn.Module:
        """The float layer with the dequantized weights (what PackedSequence inputs run on)."""
        if self.cell:
            rnn: nn.Module = (nn.LSTMCell if self.mode == "LSTM" else nn.GRUCell)(self.input_size, self.hidden_size,
                                                                                 bias=self.bias_on)
        else:
            rnn = (nn.LSTM if self.mode == "LSTM" else nn.GRU)(
                self.input_size, self.hidden_size, self.num_layers, bias=self.bias_on, batch_first=self.batch_first,
                bidirectional=self.directions == 2)
        with torch.no_grad():
            for suffix, _ in self._matrices():
                for kind in ("ih", "hh"):
                    gate = self.gates[f"{kind}{suffix}"]
                    getattr(rnn, f"weight_{kind}{suffix}").copy_(gate.dequantized_weight())
                    if self.bias_on:
                        getattr(rnn, f"bias_{kind}{suffix}").copy_(gate.bias)
        return rnn.eval()

    def _step(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None,
              hh: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One time step: gi (B, G*H) input projection, h / c (B, H) state -> new (h, c)."""
        gh = hh(h)  # (B, G*H)
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        ir, iz, i_n = gi.chunk(3, dim=-1)
        hr, hz, h_n = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None

    def forward(self, x: Any, hx: Any = None) -> Any:
        if isinstance(x, nn.utils.rnn.PackedSequence):
            if not self._twin:
                self._twin.append(self.to_float())
            return self._twin[0](x, hx)
        if not self.cell and torch.onnx.is_in_onnx_export():  # one LSTM/GRU node, sequence length kept dynamic
            return self._exported(x, hx)
        return self._cell(x, hx) if self.cell else self._sequence(x, hx)

    def _exported(self, x: torch.Tensor, hx: Any) -> Any:
        """torch's own fused recurrence (``torch.lstm`` / ``torch.gru``, what ``nn.LSTM`` / ``nn.GRU`` call)
        on the dequantized weights: the ONNX exporter writes it as one LSTM / GRU node per layer."""
        batched = x.dim() == 3
        x = x if batched else x.unsqueeze(1)  # (T, B, In), or (B, T, In) when batch_first
        batch = x.shape[0] if self.batch_first and batched else x.shape[1]
        zeros = x.new_zeros(self.num_layers * self.directions, batch, self.hidden_size)  # (L*D, B, H)
        params = []
        for suffix, _ in self._matrices():
            gates = [self.gates[f"{kind}{suffix}"] for kind in ("ih", "hh")]
            params += [g.dequantized_weight() if hasattr(g, "dequantized_weight") else g.weight for g in gates]
            params += [g.bias for g in gates] if self.bias_on else []
        first = self.batch_first and batched
        if self.mode == "LSTM":
            h0, c0 = (zeros, zeros) if hx is None else (t if batched else t.unsqueeze(1) for t in hx)
            out, h, c = torch.lstm(x, (h0, c0), params, self.bias_on, self.num_layers, 0.0, False,
                                   self.directions == 2, first)
            return (out, (h, c)) if batched else (out.squeeze(1), (h.squeeze(1), c.squeeze(1)))
        h0 = zeros if hx is None else (hx if batched else hx.unsqueeze(1))
        out, h = torch.gru(x, h0, params, self.bias_on, self.num_layers, 0.0, False, self.directions == 2, first)
        return (out, h) if batched else (out.squeeze(1), h.squeeze(1))

    def _cell(self, x: torch.Tensor, hx: Any) -> Any:
        batched = x.dim() == 2
        x = x if batched else x[None]  # (B, In)
        zeros = x.new_zeros(x.shape[0], self.hidden_size)  # (B, H)
        if self.mode == "LSTM":
            h, c = (zeros, zeros) if hx is None else (t if batched else t[None] for t in hx)
        else:
            h, c = (zeros if hx is None else (hx if batched else hx[None])), None
        h, c = self._step(self.gates["ih"](x), h, c, self.gates["hh"])
        if not batched:
            h, c = h[0], (c[0] if c is not None else None)
        return (h, c) if self.mode == "LSTM" else h

    def _sequence(self, x: torch.Tensor, hx: Any) -> Any:
        batched = x.dim() == 3
        x = x if batched else x.unsqueeze(1)
        x = x.transpose(0, 1) if self.batch_first and batched else x  # (T, B, In)
        states = self.num_layers * self.directions
        zeros = x.new_zeros(states, x.shape[1], self.hidden_size)  # (L*D, B, H)
        if self.mode == "LSTM":
            h0, c0 = (zeros, zeros) if hx is None else (t if batched else t.unsqueeze(1) for t in hx)
        else:
            h0, c0 = (zeros if hx is None else (hx if batched else hx.unsqueeze(1))), None
        last_h, last_c = [], []
        layer_in = x
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.directions):
                k = layer * self.directions + d
                suffix = f"_l{layer}{'_reverse' if d else ''}"
                gi = self.gates[f"ih{suffix}"](layer_in)  # (T, B, G*H): every step's input projection at once
                h, c = h0[k], (c0[k] if c0 is not None else None)
                steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
                hs = [torch.empty(0)] * x.shape[0]
                for t in steps:
                    h, c = self._step(gi[t], h, c, self.gates[f"hh{suffix}"])
                    hs[t] = h
                outs.append(torch.stack(hs))  # (T, B, H)
                last_h.append(h)
                if c is not None:
                    last_c.append(c)
            layer_in = torch.cat(outs, dim=-1)  # (T, B, D*H)
        out = layer_in.transpose(0, 1) if self.batch_first and batched else layer_in
        h_n = torch.stack(last_h)  # (L*D, B, H)
        if not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
        if self.mode == "LSTM":
            c_n = torch.stack(last_c)
            return out, (h_n, c_n if batched else c_n.squeeze(1))
        return out, h_n


def quantize_recurrent(model: nn.Module, names: list[str], skipped: dict[str, str], *, bits: int = 8,
                       group_size: int = 0, activations: str = "dynamic") -> dict[str, nn.Module]:
    """Swap each recurrent layer in ``names`` for a ``QuantRecurrent``; the originals by name.

    Layers that stay float are put in ``skipped`` with the reason (replacing a generic one)."""
    originals: dict[str, nn.Module] = {}
    for name in names:
        layer = model.get_submodule(name)
        reason = recurrent_reason(layer)
        if reason:
            skipped[name] = reason
            continue
        skipped.pop(name, None)
        set_submodule(model, name, QuantRecurrent.from_float(layer, bits=bits, group_size=group_size,
                                                             activations=activations))
        originals[name] = layer
    return originals


def recurrent_targets(model: nn.Module, targets: Any, exclude: Any) -> list[str]:
    """The recurrent layers a quantizer's ``targets`` reach ("all": every one; "all-linear": none)."""
    if targets == "all-linear":
        return []
    return select(model, ".*" if targets == "all" else targets, exclude, kinds=RECURRENT)
