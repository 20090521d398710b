"""The ``slimkit`` command: thin; every technique command builds a recipe and runs it (``slimkit.pipeline``)."""

from slimkit.cli import search_commands, technique_commands  # noqa: F401  (register their commands on the app)
from slimkit.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
