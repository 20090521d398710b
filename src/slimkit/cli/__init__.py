"""The ``slimkit`` command: thin; every technique command builds a recipe and runs it (``slimkit.pipeline``)."""

from slimkit.cli import export_command, search_commands, technique_commands  # noqa: F401  (register their commands)
from slimkit.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
