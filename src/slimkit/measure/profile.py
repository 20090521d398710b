"""``profile(model, example)``: every measurement of one model in one record.

The record is what the rest of slimkit compares: the baseline before optimization, each
candidate during search, the final artifact in the report. It is plain data (JSON round-trip)
plus a rich rendering for the console.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console

from slimkit.core.errors import SlimkitError
from slimkit.measure._call import (
    Example,
    as_call,
    describe,
    pinned_threads,
    prepared,
    require_module,
    resolve_device,
    tensor_bytes,
)
from slimkit.measure._render import render_profile
from slimkit.measure.breakdown import SORT_KEYS, LayerRow, layer_breakdown
from slimkit.measure.cuda_profile import cuda_latency, model_roofline, state_nbytes
from slimkit.measure.energy import estimate_energy
from slimkit.measure.flops import count_flops
from slimkit.measure.latency import Latency, measure_latency
from slimkit.measure.memory import peak_memory
from slimkit.measure.size import artifact_size, count_params


@dataclasses.dataclass(frozen=True)
class Profile:
    """Measurements of one model on one device. Sizes in bytes, times in ms, energy in mJ."""

    model: str  # class name
    inputs: list[str]  # e.g. ["float32[1, 1, 28, 28]"]
    device: str
    threads: int
    torch_version: str
    params_total: int
    params_nonzero: int
    artifact_bytes: int
    macs: int
    flops: int
    latency: Latency
    peak_memory_bytes: int
    energy_mj_estimate: float
    energy_note: str
    layers: list[LayerRow]
    #: CUDA only: achieved TFLOP/s and GB/s against the device's measured peaks (runtime.cuda_profile).
    roofline: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        data = dict(data)
        data["latency"] = Latency(**data["latency"])
        data["layers"] = [LayerRow(**row) for row in data["layers"]]
        return cls(**data)

    def render(self, top: int = 10) -> Any:
        """A rich renderable: the summary table and the ``top`` layers (in stored order)."""

        return render_profile(self, top)

    def __rich__(self) -> Any:
        return self.render()

    def __str__(self) -> str:

        console = Console(width=110, record=True, file=_Discard(), color_system=None)
        console.print(self.render())
        return console.export_text()


def profile(model: nn.Module, example: Example, device: str | torch.device = "cpu", threads: int | None = None,
            min_time_s: float = 0.5, breakdown_runs: int = 5, sort_by: str = "time") -> Profile:
    """Measure ``model`` on ``example``: size, parameters, MACs, latency, peak memory, energy estimate, layers.

    ``threads`` pins ``torch.set_num_threads`` for the whole profile (restored after). ``min_time_s``
    is the latency timing budget; layers are timed over ``breakdown_runs`` runs and sorted by ``sort_by``.
    """
    require_module(model, "profile")
    if sort_by not in SORT_KEYS:
        raise SlimkitError(f"sort_by={sort_by!r} is not a breakdown column", f"use one of {', '.join(SORT_KEYS)}")
    dev = resolve_device(device)
    with prepared(model, example, dev) as (args, kwargs), pinned_threads(threads) as used:
        _check_runs(model, args, kwargs, example)
        here: Example = kwargs if kwargs else args  # inputs already on the device
        total, nonzero = count_params(model)
        flops = count_flops(model, here, dev)
        if dev.type == "cuda":  # CUDA events, graph replay where possible, and the roofline fractions
            roof = _cuda_roofline(model, here, dev, flops.flops, min_time_s)
            latency = roof.pop("latency")
        else:
            roof, latency = None, measure_latency(model, here, dev, threads=used, min_time_s=min_time_s)
        memory = peak_memory(model, here, dev)
        layers = layer_breakdown(model, here, dev, threads=used, runs=breakdown_runs, sort_by=sort_by, flops=flops)
        energy = estimate_energy(model, here, dev, flops=flops)
        size = artifact_size(model)
    return Profile(model=type(model).__name__, inputs=describe(example), device=str(dev), threads=used,
                   torch_version=torch.__version__, params_total=total, params_nonzero=nonzero, artifact_bytes=size,
                   macs=flops.macs, flops=flops.flops, latency=latency, peak_memory_bytes=memory,
                   energy_mj_estimate=energy.total_mj, energy_note=energy.basis, layers=layers, roofline=roof)


def _cuda_roofline(model: nn.Module, example: Example, dev: torch.device, flops: int, min_time_s: float) -> dict:
    """CUDA-event latency (graph replay where the model can be captured) and its roofline fractions."""

    args, kwargs = as_call(example)
    with torch.inference_mode():
        out_bytes = tensor_bytes(model(*args, **kwargs))
    latency, mode = cuda_latency(lambda: model(*args, **kwargs), dev, min_time_s=min_time_s)
    nbytes = state_nbytes(model) + tensor_bytes(example) + out_bytes
    return {**model_roofline(model, dev, flops, nbytes, latency.p50_ms), "timing": mode, "latency": latency}


def _check_runs(model: nn.Module, args: tuple, kwargs: dict, example: Example) -> None:
    """Run the model once so a mismatch with the example is one clear error, not a deep traceback."""
    try:
        with torch.inference_mode():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is reported the same way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SlimkitError(f"{type(model).__name__} failed on the example inputs {describe(example)}: {first}",
                           "pass example inputs shaped like what the model's forward expects") from exc


class _Discard:
    """A file that drops what is written (the recorded console keeps the text)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
