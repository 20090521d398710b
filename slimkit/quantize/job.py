"""``slimkit quantize``: quantize a task's model, run it for real, measure, save and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit import io, zoo
from slimkit.candidate import Candidate, measure_candidate
from slimkit.config import BaseConfig, apply
from slimkit.errors import SlimkitError
from slimkit.job import comparison_report, summary, with_options
from slimkit.quantize.cast import BFloat16, Float16
from slimkit.quantize.configs import Int8, WeightOnly
from slimkit.quantize.layer_error import LayerError, layer_errors
from slimkit.report import Report
from slimkit.runtime import backend_reason

PRESETS: dict[str, BaseConfig] = {
    "int8-dynamic": Int8(activations="dynamic"),
    # asymmetric: MiniLM cosine to fp32 0.992 vs 0.983 symmetric at the same speed (bench/quant_cpu.py)
    "int8-static": Int8(activations="static", calibration="mse", symmetric=False),
    "w8": WeightOnly(bits=8),
    "w4": WeightOnly(bits=4, group_size=64),
    "fp16": Float16(),
    "bf16": BFloat16(),
}


def make_config(preset: str, **overrides: Any) -> BaseConfig:
    """A preset with the options the user set (``None`` = keep the preset's value)."""
    if preset not in PRESETS:
        raise SlimkitError(f"unknown quantization config {preset!r}", f"use one of {', '.join(PRESETS)}")
    return with_options(PRESETS[preset], preset, **overrides)


def run(task_name: str, config: BaseConfig, out: str | Path, *, threads: int | None = None,
        name: str | None = None) -> Path:
    """Quantize, build on the config's backend, measure against the float baseline, write artifact + report."""
    from rich.console import Console

    console = Console()
    out = Path(out)
    task = zoo.load(task_name)
    console.print(f"[bold]task[/] {task.name}: {task.description}")
    baseline = measure_candidate("baseline (fp32)", task.model, [], task, threads=threads)
    qmodel = apply(task.model, config, task)
    backend = getattr(config, "backend", "auto")
    candidate = measure_candidate(name or config.type_name, qmodel, [config], task, backend=backend, threads=threads)
    errors = layer_errors(task.model, qmodel, task.calib) if hasattr(qmodel, "slimkit_quant") else []
    info = dict(getattr(qmodel, "slimkit_quant", {}))
    info["kernels"] = {n: getattr(m, "kernel", "") for n, m in qmodel.named_modules() if hasattr(m, "kernel")}
    runnable = candidate.runnable
    info["backend"] = candidate.backend
    info["backend_reason"] = backend_reason(qmodel, backend)
    if hasattr(runnable, "kernels"):
        info["runtime_ops"] = dict(runnable.kernels)
        info["runtime_skipped"] = dict(getattr(runnable, "skipped", {}))
    io.save(qmodel, out / "model", recipe=[config.to_dict()], extra={"task": task.name, "quantization": info})
    report = _report(task, [baseline, candidate], info, errors)
    path = report.write(out)
    console.print(summary(baseline, candidate))
    console.print(f"[green]report[/] {path}")
    return path


def _report(task: Any, candidates: list[Candidate], info: dict[str, Any], errors: list[LayerError]) -> Report:
    r = comparison_report(f"slimkit quantization — {task.name}", "Measured on the deployed runtime", task,
                          candidates, quantization=info, layer_errors=[e.to_dict() for e in errors])
    r.note("Size: bytes of the saved artifact (packed integer weights + scales). Latency and metric: "
           "the quantized model running on the backend named in the runtime column.")
    if info.get("backend_reason"):
        r.note(f"Backend: {info['backend_reason']}.")
    kept = {**info.get("skipped", {}), **info.get("runtime_skipped", {})}
    if kept or info.get("reverted"):
        r.heading("Layers kept in float")
        rows = [[n, why] for n, why in kept.items()] + [[n, "reverted by accuracy control"] for n in info["reverted"]]
        r.table(["layer", "reason"], rows)
    if errors:
        r.heading("Per-layer quantization error (each layer alone, float input)")
        r.table(["layer", "type", "kernel", "SQNR dB", "worst-channel SQNR dB", "max abs error", "mean abs error"],
                [[e.name, e.kind, e.kernel, e.sqnr_db, e.worst_channel_sqnr_db, e.max_abs, e.mean_abs] for e in errors])
        worst = errors[:4]
        r.histogram("output error of the worst layers", {e.name: e.sample.tolist() for e in worst},
                    "quantized - float output")
    return r
