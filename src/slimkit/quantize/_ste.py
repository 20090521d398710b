"""Straight-through estimators: rounding that trains.

``round`` has zero gradient almost everywhere, so quantization-aware training pretends it is the
identity on the way back (Bengio et al.'s straight-through estimator): the gradient of a
fake-quantized tensor with respect to its input is 1 inside the representable range and 0 where
it was clipped. The step size gets LSQ's gradient (Esser et al. 2020) from the same expression:
inside, ``round(x/s) - x/s``; clipped, ``qmin - z`` or ``qmax - z``; scaled by
``g = 1 / sqrt(elements per step * qmax)`` so the step learns at a pace comparable to the weights.
"""

from __future__ import annotations

import math

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward; its gradient multiplied by ``g`` backward (LSQ's gradient scale)."""
    return (x - x * g).detach() + x * g


def lsq_grad_scale(elements_per_step: int, qmax: int) -> float:
    """LSQ's ``1 / sqrt(N * Q_p)``: N values share one step, Q_p is the top integer level."""
    return 1.0 / math.sqrt(max(1, elements_per_step) * max(1, qmax))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / s + z), qmin, qmax) - z) * s`` with straight-through rounding.

    Gradient to ``x``: 1 where ``x / s + z`` lies in ``[qmin, qmax]``, 0 outside. Gradient to a
    ``scale`` that requires grad: LSQ's (see the module docstring); to a float ``zero``: 0 inside,
    ``-s`` where clipped. ``scale``/``zero`` broadcast against ``x``.
    """
    q = round_ste(torch.clamp(x / scale + zero, qmin, qmax))  # clip before rounding: LSQ's boundaries
    return (q - zero) * scale


def lsq(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor | float, qmin: int, qmax: int,
        elements_per_step: int) -> torch.Tensor:
    """Fake quantization with a learned step ``step`` whose gradient carries LSQ's scale."""
    return fake_quant(x, scale_grad(step, lsq_grad_scale(elements_per_step, qmax)), zero, qmin, qmax)


__all__ = ["fake_quant", "lsq", "lsq_grad_scale", "round_ste", "scale_grad"]
