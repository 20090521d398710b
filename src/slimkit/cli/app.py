"""The ``slimkit`` command. Every user-facing error is one line with a hint, exit code 2; an exception from
the user's own task or model code is its line and the user's frame, exit code 1."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.core import TyperGroup

from slimkit.cli.nproc_option import NPROC, relaunch, worker_out
from slimkit.cli.numeric_options import check_numbers
from slimkit.cli.out_guard import check_file_target, check_fresh_out, guarded_out
from slimkit.cli.run_summary import console_on_stderr, print_json
from slimkit.cli.task_options import DATA, DEFAULT_TASK, INPUT_SHAPE, METRIC, MODEL, TASK, WEIGHTS, load_task
from slimkit.cli.user_errors import describe, user_frame
from slimkit.core.errors import SlimkitError

# torch and slimkit's own layers are imported inside the command bodies: `slimkit --help` and a
# mistyped option are answered without them (tests/test_cli_conventions.py checks sys.modules).

#: Click's error classes, whichever click typer runs on (its own vendored copy, or the click package).
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineErrors(TyperGroup):
    """Typer's own errors (an unknown option, ``--lr abc``, a missing ``--study``) in the same one-line
    form as slimkit's, instead of a usage box: every bad input reads alike and exits with 2."""

    def main(self, args: Any = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # plain `slimkit`: the help, as before
                exc.show()
                sys.exit(exc.exit_code)
            where = exc.ctx.command_path if exc.ctx is not None else "slimkit"
            typer.echo(f"error: {' '.join(exc.format_message().split())} — see {where} --help", err=True)
            sys.exit(2)
        except _CLICK_ERROR as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=OneLineErrors,
                  help="Make trained PyTorch models smaller and faster, with measurements.")


def package_version() -> str:
    """The installed package's version, read from its metadata (no torch import for ``--version``)."""
    try:
        return importlib.metadata.version("slimkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from slimkit.core.versions import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"slimkit {package_version()}")
        raise typer.Exit(0)


#: Options given before the command (``slimkit --debug quantize ...``), set on every invocation.
SETTINGS = {"debug": False}


@app.callback()
def _options(ctx: typer.Context, version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="print slimkit's version and exit"),
             debug: bool = typer.Option(False, "--debug", help="an error in your own task or model code: show the "
                                        "full traceback, not its line and frame"),
             nproc: int = NPROC) -> None:
    """Make trained PyTorch models smaller and faster, with measurements."""
    SETTINGS["debug"] = debug
    if nproc != 1:  # the same command under torchrun, N processes; its exit code is ours
        try:
            code = relaunch(nproc, ctx.invoked_subcommand)
        except SlimkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(code)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Check every numeric option, refuse an ``--out`` that holds a previous run (unless ``--overwrite`` /
    ``--resume``), hold ``--out`` (writable, locked), then run. Errors are one line (exit 2); an exception from the
    user's own code is its line and frame (exit 1; the full traceback with ``--debug``). With ``--json`` the
    run prints to stderr and the summary the command returns is the only thing on stdout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        as_json = bool(kwargs.get("as_json"))
        worker_out(kwargs)  # ranks > 0 of --nproc: a scratch --out (removed at exit), no stdout
        try:
            check_numbers(kwargs)
            out = kwargs.get("out")
            if isinstance(out, Path) and "overwrite" in kwargs:
                check_fresh_out(out, overwrite=kwargs["overwrite"], resume=kwargs.get("resume"))
            with contextlib.ExitStack() as held:
                if isinstance(out, Path):
                    held.enter_context(guarded_out(out))
                with console_on_stderr(as_json):
                    summary = fn(*args, **kwargs)
        except SlimkitError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except (typer.Exit, _CLICK_ERROR):
            raise
        except Exception as exc:
            frame = user_frame(exc.__traceback__)
            if frame is None or SETTINGS["debug"]:
                raise  # slimkit's or a library's own failure: the whole traceback is the useful report
            for line in describe(exc, frame):
                typer.echo(line, err=True)
            raise typer.Exit(1) from None
        if as_json and summary is not None:
            print_json(summary)

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
def profile(task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
            data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
            device: str = typer.Option("cpu", help="cpu or cuda"),
            threads: Optional[int] = typer.Option(None, help="threads to pin while timing (default: torch's)"),
            json_out: Optional[Path] = typer.Option(None, "--json", help="also write the profile as JSON")) -> None:
    """Profile a task's model: params, artifact bytes, MACs, latency, memory, energy, per layer."""
    import torch
    from rich.console import Console

    from slimkit.measure import profile as run_profile

    if not (device == "cpu" or device.startswith("cuda")):
        raise SlimkitError(f"--device {device!r} is not supported", "use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimkitError("device cuda requested but CUDA is not available here", "use --device cpu")
    if json_out is not None:
        check_file_target(json_out, "--json")
    t, _ = load_task(task, DEFAULT_TASK, model, weights, data, input_shape, metric)
    p = run_profile(t.model, t.example, device=device, threads=threads)
    Console().print(p.render())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(p.to_dict(), indent=2))


@app.command()
@_friendly
def techniques() -> None:
    """List every registered technique: its recipe type, stage, search name, presets and summary."""
    from rich.console import Console
    from rich.table import Table

    from slimkit.core.registry import all_techniques

    table = Table(title="techniques (use with: slimkit apply --step 'TYPE key=value ...')")
    for col in ("type", "stage", "search", "presets", "what"):
        table.add_column(col)
    for tech in all_techniques():
        table.add_row(tech.name, tech.stage, tech.search or "", ", ".join(tech.presets()), tech.summary)
    Console().print(table)
