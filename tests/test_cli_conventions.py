"""Command-line conventions shared by every command: --version, help without torch, --out refusing to
overwrite, --json on stdout, one-line errors for a user's own code."""

from __future__ import annotations

import importlib.metadata

from typer.testing import CliRunner

from slimkit.cli.app import app
from slimkit.core.versions import __version__

runner = CliRunner()


def test_version_prints_the_package_version_and_exits_0():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"slimkit {__version__}\n"
    assert importlib.metadata.version("slimkit") == __version__
