"""Command-line conventions shared by every command: --version, help without torch, --out refusing to
overwrite, --json on stdout, one-line errors for a user's own code."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from slimkit.cli.app import app
from slimkit.core.versions import __version__

runner = CliRunner()


def test_version_prints_the_package_version_and_exits_0():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"slimkit {__version__}\n"
    assert importlib.metadata.version("slimkit") == __version__


#: Runs the command line in a fresh interpreter and prints, as JSON, its exit code, what it printed and
#: which heavy modules it imported.
HELP_PROBE = """
import contextlib, io, json, sys
from slimkit.cli import app
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        app(sys.argv[1:], prog_name="slimkit")
        code = 0
    except SystemExit as exc:
        code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "optuna")}
               | {m for m in sys.modules if m.startswith("slimkit.") and not m.startswith(("slimkit.cli", "slimkit.core.errors"))
                  and m != "slimkit.core"})
print(json.dumps({"code": code, "out": out.getvalue(), "err": err.getvalue(), "heavy": heavy}))
"""


def _probe(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "COLUMNS": "200"})
    return json.loads(done.stdout)


@pytest.mark.parametrize("args,code,shows", [
    (["--help"], 0, "Usage: slimkit [OPTIONS] COMMAND"),
    (["--version"], 0, f"slimkit {__version__}"),
    (["quantize", "--help"], 0, "Usage: slimkit quantize [OPTIONS]"),
    (["optimize", "--help"], 0, "--max-size-mb"),
    (["prune", "--no-such-option"], 2, "error: No such option: --no-such-option"),
    (["distill", "--lr", "abc"], 2, "error: Invalid value for '--lr'"),
    (["prune", "--lr", "nan"], 2, "error: --lr nan is not a number — give a number > 0"),
])
def test_help_and_argument_errors_do_not_import_torch_or_the_techniques(args, code, shows):
    seen = _probe(*args)
    assert seen["code"] == code
    assert shows in seen["out"] + seen["err"]
    assert seen["heavy"] == []
