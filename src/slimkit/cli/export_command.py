"""``slimkit export``: the deployable ONNX file of a run or an artifact, the one that was measured."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slimkit.cli.app import _friendly, app
from slimkit.cli.out_guard import check_file_target
from slimkit.cli.task_options import DATA, INPUT_SHAPE, METRIC, MODEL, TASK, WEIGHTS, task_spec
from slimkit.core.errors import SlimkitError


@app.command("export")
@_friendly
def export(source: Path = typer.Argument(..., help="a run directory (--out of a command) or a slimkit artifact"),
           format: str = typer.Option("onnx", "--format", help="onnx (the file ONNX Runtime was measured with)"),
           out_file: Path = typer.Option(Path("model.onnx"), "--out", help="the .onnx file to write (and its .json)"),
           task: Optional[str] = TASK, model: Optional[str] = MODEL, weights: Optional[str] = WEIGHTS,
           data: Optional[str] = DATA, input_shape: Optional[str] = INPUT_SHAPE, metric: str = METRIC,
           threads: Optional[int] = typer.Option(None, help="threads of the rebuilt session")) -> None:
    """Write the ONNX file a run was measured with: copied when the run kept it, else rebuilt from the artifact
    (needs the task, for example inputs); a model measured on torch is built on ONNX Runtime and its OUT.json
    says "measured": false. Runs with onnxruntime and numpy alone; OUT.json lists its inputs, outputs,
    dynamic axes and how each layer is stored."""
    from slimkit import zoo
    from slimkit.runtime.onnx_file import export_onnx_file

    if format != "onnx":
        raise SlimkitError(f"--format {format!r} is not supported", "use --format onnx")
    if not source.exists():
        raise SlimkitError(f"{source} does not exist", "give a run directory or a slimkit artifact")
    check_file_target(out_file, "--out")
    spec = task_spec(task, None, model, weights, data, input_shape, metric)
    example = zoo.load(spec).example if spec is not None else None
    path = export_onnx_file(source, out_file, example, threads=threads)
    typer.echo(f"onnx {path} (inputs and outputs in {path.name}.json)")
