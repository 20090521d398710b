"""The ``slimkit`` command. Every user-facing error is one line with a hint, exit code 2."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from slimkit.errors import SlimkitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Make trained PyTorch models smaller and faster, with measurements.")


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SlimkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_friendly
def tasks() -> None:
    """List the built-in tasks with their data splits and metrics."""
    from rich.console import Console
    from rich.table import Table

    from slimkit.zoo import BUILTINS, describe

    table = Table(title="built-in tasks (or --task package.module:function)")
    for col in ("task", "what", "splits", "metric"):
        table.add_column(col)
    for name in BUILTINS:
        info = describe(name)
        table.add_row(name, info["summary"], ", ".join(f"{k} {v}" for k, v in info["splits"].items()), info["metric"])
    Console().print(table)


@app.command()
@_friendly
def profile(task: str = typer.Option("digits", help="built-in task name or package.module:function"),
            device: str = typer.Option("cpu", help="cpu or cuda"),
            threads: Optional[int] = typer.Option(None, help="threads to pin while timing (default: torch's)"),
            json_out: Optional[Path] = typer.Option(None, "--json", help="also write the profile as JSON")) -> None:
    """Profile a task's model: params, artifact bytes, MACs, latency, memory, energy, per layer."""
    from rich.console import Console

    from slimkit import zoo
    from slimkit.measure import profile as run_profile

    t = zoo.load(task)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SlimkitError("device cuda requested but CUDA is not available here", "use --device cpu")
    p = run_profile(t.model, t.example, device=device, threads=threads)
    Console().print(p.render())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(p.to_dict(), indent=2))


@app.command()
@_friendly
def demo(task: str = typer.Option("mnist", help="task to run the demo on"),
         out: Path = typer.Option(Path("runs/demo"), help="output directory"),
         threads: Optional[int] = typer.Option(None, help="threads to pin while timing"),
         trials: int = typer.Option(12, help="trials of the search"),
         time_budget: float = typer.Option(240.0, help="stop starting trials after this many seconds")) -> None:
    """The job `make demo` runs: profile the task's model, search for the best one under a default target."""
    from slimkit.demo import run

    run(task, out, threads=threads, trials=trials, time_budget=time_budget)


@app.command()
@_friendly
def quantize(task: str = typer.Option("mnist", help="built-in task name or package.module:function"),
             config: str = typer.Option("int8-dynamic", help="int8-dynamic, int8-static, w8, w4, fp16, bf16"),
             calibration: Optional[str] = typer.Option(None, help="static int8: minmax, percentile, entropy, mse"),
             percentile: Optional[float] = typer.Option(None, help="percentile for --calibration percentile"),
             granularity: Optional[str] = typer.Option(None, help="int8 weights: per_channel or per_tensor"),
             group_size: Optional[int] = typer.Option(None, help="weight-only: 0 (per channel), 32, 64, 128"),
             backend: Optional[str] = typer.Option(None, help="auto, onnxruntime or torch"),
             max_drop: Optional[float] = typer.Option(None, help="accuracy control: largest metric drop allowed"),
             embedding_bits: Optional[int] = typer.Option(None, help="embedding tables: 8 (default) or 4"),
             method: Optional[str] = typer.Option(None, help="w4 rounding: rtn (default) or gptq (calibrated)"),
             threads: Optional[int] = typer.Option(None, help="threads to pin while timing"),
             out: Path = typer.Option(Path("runs/quantize"), help="output directory")) -> None:
    """Quantize a task's model, run it on real integer kernels, measure it and write a report."""
    from slimkit.quantize.job import make_config, run

    cfg = make_config(config, calibration=calibration, percentile=percentile, granularity=granularity,
                      group_size=group_size, backend=backend, max_drop=max_drop, embedding_bits=embedding_bits,
                      method=method)
    run(task, cfg, out, threads=threads, name=config)


@app.command()
@_friendly
def prune(task: str = typer.Option("digits", help="built-in task name or package.module:function"),
          method: str = typer.Option("channels", help="channels (structured), magnitude (unstructured), nm"),
          amount: Optional[float] = typer.Option(None, help="fraction to remove: channels per group, or weights"),
          macs_ratio: Optional[float] = typer.Option(None, help="channels: MACs to keep, e.g. 0.5 (overrides amount)"),
          importance: Optional[str] = typer.Option(None, help="channels: l1, l2, bn_scale, taylor, random"),
          round_to: Optional[int] = typer.Option(None, help="channels: keep widths multiples of this, e.g. 8"),
          scope: Optional[str] = typer.Option(None, help="channels: layer or global; magnitude: global or layer"),
          allocation: Optional[str] = typer.Option(
              None, help="channels: uniform, macs (widths where MACs are cheap) or latency (per-layer times measured here)"),
          latency_batch: Optional[int] = typer.Option(None, help="channels, allocation latency: batch to time layers at"),
          reconstruct: Optional[bool] = typer.Option(None, "--reconstruct/--no-reconstruct",
                                                     help="channels: refit layers that lost inputs on calibration data"),
          n: Optional[int] = typer.Option(None, help="nm: weights kept per group (default 2)"),
          m: Optional[int] = typer.Option(None, help="nm: group size (default 4)"),
          nm_method: Optional[str] = typer.Option(None, help="nm: magnitude (default) or sparsegpt (calibrated)"),
          schedule: str = typer.Option("one-shot", help="one-shot, or gradual (magnitude, cubic over fine-tuning)"),
          finetune_steps: int = typer.Option(0, help="fine-tuning steps after pruning, pruned weights kept out"),
          lr: Optional[float] = typer.Option(None, help="peak fine-tuning learning rate (default 1e-3)"),
          threads: Optional[int] = typer.Option(None, help="threads to pin while fine-tuning and timing"),
          out: Path = typer.Option(Path("runs/prune"), help="output directory")) -> None:
    """Prune a task's model, fine-tune it, measure it against the original and write a report."""
    from slimkit.prune.job import make_config, run

    cfg = make_config(method, amount=amount, macs_ratio=macs_ratio, importance=importance, round_to=round_to,
                      scope=scope, allocation=allocation, latency_batch=latency_batch, reconstruct=reconstruct,
                      n=n, m=m, nm_method=nm_method)
    run(task, cfg, out, finetune_steps=finetune_steps, lr=lr, schedule=schedule, threads=threads)


@app.command()
@_friendly
def distill(task: str = typer.Option("mnist", help="built-in task name or package.module:function"),
            student: str = typer.Option("self", help="self, layers:N (encoder keeping N blocks) or an artifact dir"),
            steps: int = typer.Option(200, help="distillation steps"),
            lr: float = typer.Option(1e-3, help="peak learning rate (about 3e-5 for pre-trained transformers)"),
            temperature: float = typer.Option(4.0, help="softmax temperature of the logit KD loss"),
            alpha: float = typer.Option(0.5, help="weight of the KD loss against the hard-label loss"),
            features: Optional[str] = typer.Option(None, help="feature KD pairs student:teacher,... (module names)"),
            relational: float = typer.Option(0.0, help="weight of the relational (Gram matrix) loss"),
            compare: bool = typer.Option(True, help="also fine-tune the student on labels alone, same budget"),
            threads: Optional[int] = typer.Option(None, help="threads to pin while training and timing"),
            out: Path = typer.Option(Path("runs/distill"), help="output directory")) -> None:
    """Distill a task's model into a student, compare with plain fine-tuning, write a report."""
    from slimkit.distill import Distill
    from slimkit.distill.job import parse_features, run

    cfg = Distill(steps=steps, lr=lr, temperature=temperature, alpha=alpha, features=parse_features(features),
                  relational=relational)
    run(task, student, cfg, out, compare=compare, threads=threads)


@app.command()
@_friendly
def factorize(task: str = typer.Option("mnist", help="built-in task name or package.module:function"),
              method: str = typer.Option("tucker", help="svd, tucker or cp (Linear/1x1 layers always get SVD)"),
              ratio: float = typer.Option(0.3, help="fraction of each factorized layer's parameters kept"),
              energy: Optional[float] = typer.Option(None, help="svd: keep this fraction of singular-value energy"),
              sensitivity: bool = typer.Option(False, help="svd: spread ranks by measured sensitivity"),
              targets: Optional[str] = typer.Option(None, help="all, all-linear or a regex of layer names"),
              exclude: Optional[str] = typer.Option(None, help="comma-separated layer names to leave whole"),
              finetune_steps: int = typer.Option(0, help="recovery steps after factorizing"),
              distill: bool = typer.Option(False, "--distill", help="recover by distilling from the original"),
              lr: Optional[float] = typer.Option(None, help="peak recovery learning rate (default 1e-3)"),
              threads: Optional[int] = typer.Option(None, help="threads to pin while training and timing"),
              out: Path = typer.Option(Path("runs/factorize"), help="output directory")) -> None:
    """Factorize a task's model (SVD, Tucker-2, CP), recover, measure against the original, report."""
    from slimkit.factorize.job import make_config, run

    names = tuple(n.strip() for n in exclude.split(",") if n.strip()) if exclude else ()
    cfg = make_config(method, ratio, targets=targets, exclude=names, energy=energy, sensitivity=sensitivity)
    run(task, cfg, out, finetune_steps=finetune_steps, distill=distill, lr=lr, threads=threads)


from slimkit.search import commands as _search_commands  # noqa: E402,F401  (optimize, apply, worker, report)


def main() -> None:
    app()
