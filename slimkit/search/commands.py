"""CLI commands of the search: ``optimize``, ``apply``, ``worker``, ``report`` (registered on ``slimkit.cli.app``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli import _friendly, app
from slimkit.errors import SlimkitError


@app.command()
@_friendly
def optimize(task: str = typer.Option("digits", help="built-in task name or package.module:function"),
             max_size_mb: Optional[float] = typer.Option(None, help="largest artifact allowed, MB"),
             max_latency_ms: Optional[float] = typer.Option(None, help="slowest p50 latency allowed, ms"),
             max_memory_mb: Optional[float] = typer.Option(None, help="largest peak memory allowed, MB"),
             max_drop: Optional[float] = typer.Option(None, help="largest metric drop allowed (0.01 = 1 point)"),
             device: str = typer.Option("cpu", help="cpu or cuda"),
             threads: Optional[int] = typer.Option(None, help="threads the target runs with"),
             trials: int = typer.Option(30, help="trials to finish (infeasible ones count)"),
             time_budget: Optional[float] = typer.Option(None, help="stop starting trials after this many seconds"),
             strategy: str = typer.Option("auto", help="auto, tpe or nsga2"),
             techniques: Optional[str] = typer.Option(None, help="comma list to search over (default: all)"),
             seed: int = typer.Option(0, help="seed of the sampler and of every technique"),
             out: Path = typer.Option(Path("runs/optimize"), help="run directory: study.db, best/, recipe, report"),
             storage: Optional[str] = typer.Option(None, help="database URL (default sqlite in --out)"),
             study: Optional[str] = typer.Option(None, help="study name in the storage"),
             resume: bool = typer.Option(False, "--resume", help="continue a killed run of the same study")) -> None:
    """Search technique pipelines for the best model that fits the target; write best/, recipe.yaml, report."""
    from slimkit.search.optimize import optimize as run
    from slimkit.target import Target

    target = Target(max_size_mb=max_size_mb, max_latency_ms=max_latency_ms, max_memory_mb=max_memory_mb,
                    max_drop=max_drop, device=device, threads=threads)
    if not target.names():
        raise SlimkitError("no limit given", "set at least one of --max-size-mb, --max-latency-ms, --max-drop")
    names = [n.strip() for n in techniques.split(",") if n.strip()] if techniques else None
    result = run(task, target, trials=trials, time_budget=time_budget, strategy=strategy, storage=storage,
                 study=study, seed=seed, out=out, resume=resume, technique_names=names, task_spec=task)
    print_summary(result)


def print_summary(result: object) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    r = result  # OptimizeResult
    table = Table(title=f"{r.task}: original vs best of {len(r.trials)} trials")
    for col in ("", "MB", "latency ms", "metric", "drop", "pipeline"):
        table.add_column(col)
    b = r.baseline
    table.add_row("original", f"{b.size_mb:.4g}", f"{b.latency_ms:.3g}", f"{b.score:.4f}", "", "")
    if r.best is not None:
        m = r.best.measured
        table.add_row(f"best (#{r.best.number})", f"{m.size_mb:.4g}", f"{m.latency_ms:.3g}", f"{m.score:.4f}",
                      f"{m.drop:+.4f}", r.best.label())
    console.print(table)
    if r.best is not None:
        console.print(f"{b.size_mb / r.best.measured.size_mb:.1f}x smaller, "
                      f"{b.latency_ms / r.best.measured.latency_ms:.2f}x faster")
    else:
        console.print("[red]no candidate met the target[/]")
        for hint in r.hints:
            console.print(f"  - {hint}")
    if r.out is not None:
        console.print(f"[green]report[/] {Path(r.out) / 'report.html'}")


@app.command("apply")
@_friendly
def apply_recipe(recipe: Path = typer.Argument(..., help="recipe.yaml written by slimkit optimize"),
                 task: Optional[str] = typer.Option(None, help="task (default: the one named in the recipe)"),
                 out: Path = typer.Option(Path("runs/apply"), help="where to save the resulting model")) -> None:
    """Replay a recipe on a task's model (same seed -> same weights) and save the result."""
    from rich.console import Console

    from slimkit import io, zoo
    from slimkit.recipe import Recipe

    r = Recipe.load(recipe)
    name = task or r.task
    if not name:
        raise SlimkitError("the recipe names no task", "pass --task")
    t = zoo.load(name)
    model = r.replay(t)
    io.save(model, out, recipe=[c.to_dict() for c in r.steps], extra={"task": t.name, "recipe": str(recipe)})
    Console().print(f"replayed {len(r.steps)} step(s) on {t.name}; metric {t.evaluate(model)['score']:.4f}; "
                    f"saved {out}")


@app.command()
@_friendly
def worker(study: str = typer.Option(..., help="study name, as given to slimkit optimize --study"),
           storage: str = typer.Option(..., help="database URL shared by the workers"),
           trials: Optional[int] = typer.Option(None, help="finish when the study has this many trials"),
           time_budget: Optional[float] = typer.Option(None, help="stop starting trials after this many seconds"),
           wait: float = typer.Option(120.0, help="seconds to wait for the study to be created")) -> None:
    """Take trials from a shared study (one worker per machine)."""
    from slimkit.search.worker import work

    done = work(study, storage, trials=trials, time_budget=time_budget, wait_s=wait)
    typer.echo(f"study {study}: {done} trials finished")


@app.command()
@_friendly
def report(run_dir: Path = typer.Argument(..., help="--out directory of a finished slimkit optimize"),
           task: Optional[str] = typer.Option(None, help="task (default: the one the run used)")) -> None:
    """Re-render a run's report.html / report.json from its result.json and best model."""
    import json

    from slimkit import zoo
    from slimkit.search.optimize import read_result
    from slimkit.search.report import RESULT_FILE, write_report

    path = run_dir / RESULT_FILE
    name = task or (json.loads(path.read_text()).get("task") if path.is_file() else None)
    if name is None:
        raise SlimkitError(f"{run_dir} holds no {RESULT_FILE}", "give the --out directory of a finished run")
    t = zoo.load(name)
    result = read_result(run_dir, t)
    typer.echo(f"report {write_report(result, t)}")
