"""The report's last section: the exact commands that load, export and replay this run's result.

It is written from what the run directory holds when the report is written (``model/`` of a
technique command or ``best/`` of a search, ``recipe.yaml``, the measured ONNX file), so a
command is only shown when the file it needs is there.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

#: Artifact folders a run writes: technique commands' ``model``, the search's ``best``.
ARTIFACTS = ("model", "best")
ONNX_FILES = ("model.onnx", "best.onnx")


def next_steps(out: Path, task: str | None, onnx_note: str | None = None,
               search: bool = False) -> list[tuple[str, str]]:
    """``(what, command)`` rows for the run written to ``out`` (paths as the run was given them); ``onnx_note``:
    why the run kept no ONNX file; ``search``: the report of ``slimkit optimize``, whose ``result.json`` is
    written right after it."""
    steps: list[tuple[str, str]] = []
    artifact = next((out / a for a in ARTIFACTS if (out / a).is_dir()), None)
    if artifact is not None:
        steps.append(("load it in Python (the artifact, with its layers as measured)",
                      f"import slimkit; model = slimkit.load({json.dumps(str(artifact))})"))
    kept = next((out / f for f in ONNX_FILES if (out / f).is_file()), None)
    task_opt = f" --task {shlex.quote(task)}" if task else ""
    if kept is not None:
        steps.append(("export the ONNX file that was measured (runs with onnxruntime and numpy alone)",
                      f"slimkit export {_q(out)} --format onnx --out model.onnx"))
    elif artifact is not None:
        served = (f"; this run served it on torch ({onnx_note}), so the file is built for export and its .json "
                  'says "measured": false') if onnx_note else ""
        steps.append((f"export to ONNX, rebuilt from the artifact{served}",
                      f"slimkit export {_q(out)} --format onnx --out model.onnx{task_opt}"))
    if (out / "recipe.yaml").is_file():
        replay = out.with_name(out.name + "-replay")  # runs/q -> runs/q-replay, beside the run
        steps.append(("replay the recipe: the same steps and seed give the same model (a task that is not built in "
                      "needs its --task package.module:function or --model again)",
                      f"slimkit apply {_q(out / 'recipe.yaml')}{task_opt} --out {_q(replay)}"))
    if search or (out / "result.json").is_file():
        steps.append(("re-render this report from the search's result.json", f"slimkit report {_q(out)}"))
    return steps


def _q(path: Path) -> str:
    return shlex.quote(str(path))
