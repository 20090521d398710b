"""The installed package wins over a folder named ``slimkit/`` beside the user's script (src layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("layout", ["empty folder", "checkout with its own slimkit/ inside"])
def test_folder_named_slimkit_beside_a_script_does_not_shadow_the_package(tmp_path: Path, layout: str) -> None:
    shadow = tmp_path / "slimkit"
    (shadow / "slimkit" if layout.startswith("checkout") else shadow).mkdir(parents=True)
    script = tmp_path / "use.py"
    script.write_text("import slimkit as sk\nprint(sk.Task.__name__, sk.__file__)\n")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, path = done.stdout.split()
    assert name == "Task"
    assert Path(path).resolve().parent.parent.name == "src"  # the package, not the folder beside the script
