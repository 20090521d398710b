"""CLI commands of the search: ``optimize``, ``worker``, ``report`` (registered on ``slimkit.cli.app``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.app import _friendly, app
from slimkit.cli.out_guard import OVERWRITE, guarded_out
from slimkit.cli.run_summary import JSON, optimize_summary
from slimkit.cli.task_options import DATA, DEFAULT_TASK, INPUT_SHAPE, METRIC, MODEL, TASK, WEIGHTS, load_task, task_spec
from slimkit.core.errors import SlimkitError

# The search, the zoo and torch are imported inside the command bodies (fast --help).
STRATEGIES = ("auto", "tpe", "nsga2")


@app.command()
@_friendly
def optimize(task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
             data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
             max_size_mb: Optional[float] = typer.Option(None, help="largest artifact allowed, MB"),
             max_latency_ms: Optional[float] = typer.Option(None, help="slowest p50 latency allowed, ms"),
             max_memory_mb: Optional[float] = typer.Option(None, help="largest peak memory allowed, MB"),
             max_drop: Optional[float] = typer.Option(None, help="largest metric drop allowed (0.01 = 1 point)"),
             device: str = typer.Option("cpu", help="cpu or cuda"),
             threads: Optional[int] = typer.Option(None, help="threads the target runs with"),
             trials: int = typer.Option(30, help="trials to finish (infeasible ones count)"),
             time_budget: Optional[float] = typer.Option(None, help="seconds the whole command may take (trials "
                                                         "start only while one more and the report still fit)"),
             strategy: str = typer.Option("auto", help="auto, tpe or nsga2"),
             techniques: Optional[str] = typer.Option(None, help="comma list to search over (default: all)"),
             seed: int = typer.Option(0, help="seed of the sampler and of every technique"),
             out: Path = typer.Option(Path("runs/optimize"), help="run directory: study.db, best/, recipe, report"),
             storage: Optional[str] = typer.Option(None, help="database URL (default sqlite in --out)"),
             study: Optional[str] = typer.Option(None, help="study name in the storage"),
             resume: bool = typer.Option(False, "--resume", help="continue a killed run of the same study"),
             overwrite: bool = OVERWRITE, as_json: bool = JSON) -> Optional[dict]:
    """Search technique pipelines for the best model that fits the target; write best/, recipe.yaml, report."""
    from slimkit.search.budget import process_start

    started = process_start()  # --time-budget covers the whole command: start-up and loading the task included
    from slimkit.core.registry import searchable
    from slimkit.core.target import Target
    from slimkit.search.optimize import optimize as run
    from slimkit.search.result_report import print_summary

    if strategy not in STRATEGIES:
        raise SlimkitError(f"unknown strategy {strategy!r}", f"use one of {', '.join(STRATEGIES)}")
    target = Target(max_size_mb=max_size_mb, max_latency_ms=max_latency_ms, max_memory_mb=max_memory_mb,
                    max_drop=max_drop, device=device, threads=threads)
    if not target.names():
        raise SlimkitError("no limit given", "set at least one of --max-size-mb, --max-latency-ms, --max-drop")
    names = [n.strip() for n in techniques.split(",") if n.strip()] if techniques else None
    searchable(names)  # unknown technique names fail before any work
    t, spec = load_task(task, DEFAULT_TASK, model, weights, data, input_shape, metric)
    if overwrite and storage is None:  # a new search: the previous run's study is replaced, not resumed
        (out / "study.db").unlink(missing_ok=True)
    result = run(t, target, trials=trials, time_budget=time_budget, strategy=strategy, storage=storage,
                 study=study, seed=seed, out=out, resume=resume, technique_names=names, task_spec=spec,
                 budget_start=started)
    print_summary(result)
    return optimize_summary(result) if as_json else None


@app.command()
@_friendly
def worker(study: str = typer.Option(..., help="study name, as given to slimkit optimize --study"),
           storage: str = typer.Option(..., help="database URL shared by the workers"),
           task: Optional[str] = typer.Option(None, help="the study's task when it is not built in "
                                              "(package.module:function): the study names it, you confirm it"),
           model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS, data: Optional[str] = DATA,
           input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
           trials: Optional[int] = typer.Option(None, help="finish when the study has this many trials"),
           time_budget: Optional[float] = typer.Option(None, help="stop starting trials after this many seconds"),
           wait: float = typer.Option(120.0, help="seconds to wait for the study to be created")) -> None:
    """Take trials from a shared study (one worker per machine)."""
    from slimkit.search.worker import work

    given = task_spec(task, None, model, weights, data, input_shape, metric)
    done = work(study, storage, trials=trials, time_budget=time_budget, wait_s=wait, given_task=given)
    typer.echo(f"study {study}: {done} trials finished")


@app.command()
@_friendly
def report(run_dir: Path = typer.Argument(..., help="--out directory of a finished slimkit optimize"),
           task: Optional[str] = typer.Option(None, help="the run's task when it is not built in "
                                              "(package.module:function): result.json names it, you confirm it"),
           model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS, data: Optional[str] = DATA,
           input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC) -> None:
    """Re-render a run's report.html / report.json from its result.json and best model."""
    from slimkit import zoo
    from slimkit.search.result import RESULT_FILE, read_result
    from slimkit.search.result_report import write_report

    given = task_spec(task, None, model, weights, data, input_shape, metric)
    path = run_dir / RESULT_FILE
    spec = zoo.trusted_spec(stored_task(path, run_dir), given, f"{path}")
    with guarded_out(run_dir, "run directory", create=False):
        t = zoo.load(spec)
        result = read_result(run_dir, t)
        typer.echo(f"report {write_report(result, t)}")


def stored_task(path: Path, run_dir: Path) -> str:
    """The task ``result.json`` names, read without trusting the file to be what it says."""
    from slimkit.search.result import RESULT_FILE

    if not path.is_file():
        raise SlimkitError(f"{run_dir} holds no {RESULT_FILE}", "give the --out directory of a finished run")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"is not JSON (line {exc.lineno})"
        raise SlimkitError(f"{path} {reason}", "give the result.json slimkit optimize wrote") from None
    except RecursionError:
        raise SlimkitError(f"{path} is nested too deeply to be a result file", "give the result.json slimkit "
                           "optimize wrote") from None
    except OSError as exc:
        raise SlimkitError(f"{path} cannot be read ({exc.strerror or exc})", "check the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("task"), str) or not data["task"]:
        raise SlimkitError(f"{path} is not a slimkit result file (no task name)",
                           "give the result.json slimkit optimize wrote")
    return data["task"]


@app.command()
@_friendly
def demo(task: str = typer.Option(DEFAULT_TASK, help="task to run the demo on (make demo runs mnist)"),
         out: Path = typer.Option(Path("runs/demo"), help="output directory"),
         threads: Optional[int] = typer.Option(None, help="threads to pin while timing"),
         trials: int = typer.Option(12, help="trials of the search"),
         time_budget: float = typer.Option(240.0, help="stop starting trials after this many seconds")) -> None:
    """The job `make demo` runs: profile the task's model, search for the best one under a default target."""
    from slimkit.cli.demo import run as run_demo

    run_demo(task, out, threads=threads, trials=trials, time_budget=time_budget)
