"""Measure a model: size, parameters, MACs, latency, peak memory, an energy estimate, per-layer breakdown.

Pure functions of ``(model, example inputs, device)``; nothing here changes the model it measures.
"""

from __future__ import annotations

from slimkit.measure.breakdown import LayerRow, layer_breakdown
from slimkit.measure.energy import Energy, estimate_energy
from slimkit.measure.flops import FlopCount, count_flops
from slimkit.measure.latency import Latency, measure_latency
from slimkit.measure.memory import peak_memory
from slimkit.measure.profile import Profile, profile
from slimkit.measure.sensitivity import hessian_trace, layer_sensitivity
from slimkit.measure.size import artifact_size, count_params

__all__ = [
    "Energy", "FlopCount", "Latency", "LayerRow", "Profile", "artifact_size", "count_flops", "count_params",
    "estimate_energy", "hessian_trace", "layer_breakdown", "layer_sensitivity", "measure_latency", "peak_memory", "profile",
]
