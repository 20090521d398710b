"""What every benchmark shares: the environment record, interleaved median timing, JSON output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).parent / "results"


def environment(threads: int) -> dict[str, Any]:
    import numpy
    import onnxruntime

    from slimkit.search.result_report import cpu_name

    cpu = cpu_name()
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": cpu,
            "cores": os.cpu_count(), "threads": threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__}


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, rounds: int = 7, min_time_s: float = 0.3,
                        warmup: int = 2) -> dict[str, dict[str, float]]:
    """Median (and min, max) ms per call of each function, timed in alternating rounds
    (``slimkit.measure.latency.interleaved_samples``), so ratios stay meaningful on a shared machine."""
    from slimkit.measure.latency import interleaved_samples

    samples = interleaved_samples(fns, rounds=rounds, min_time_s=min_time_s, warmup=warmup)
    return {name: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "rounds": len(v)}
            for name, v in samples.items()}


def model_latencies(models: dict[str, torch.nn.Module], inputs: tuple, *, baseline: str, threads: int,
                    rounds: int = 7, min_time_s: float = 0.3) -> dict[str, dict[str, float]]:
    """``interleaved_medians`` of each model's forward on ``inputs`` (inference mode, ``threads``
    threads); every entry also gets ``speedup``: the ``baseline`` model's median over its own."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        times = interleaved_medians({name: (lambda m=m: m(*inputs)) for name, m in models.items()},
                                    rounds=rounds, min_time_s=min_time_s)
    base = times[baseline]["median_ms"]
    return {name: {**t, "speedup": base / t["median_ms"]} for name, t in times.items()}


def previous_parts(name: str, parts: tuple[str, ...]) -> dict[str, Any]:
    """The ``parts`` of ``results/<name>.json`` from an earlier run, each with that run's environment
    (its date), so a run of one part keeps the other part's latest numbers."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    return {k: {**old[k], "environment": old[k].get("environment", old.get("environment"))}
            for k in parts if k in old}


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path
